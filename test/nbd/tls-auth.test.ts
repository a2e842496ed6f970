/**
 * TLS authentication against real clients: for each TLS configuration of an in-process
 * NbdServer, which clients (libnbd's nbdinfo and nbdsh, qemu-img/qemu-io) get in and which are
 * refused. An admitted client writes through nbdsh and reads through qemu-img, checked against the
 * export's bytes. A refused client tries to write: its tool must fail, the export's bytes must
 * be unchanged, and no connection may have reached transmission (so nothing was read either).
 */
import assert from 'node:assert/strict'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { staticExports } from '../../src/nbd/export.js'
import { createTlsContext, type NbdTlsFiles } from '../../src/nbd/tls.js'
import { isSnapError } from '../../src/errors.js'
import { pattern } from '../cli/helpers.js'
import { logsAreClean, startTestServer, type TestServer } from '../support/nbd-test-server.js'
import { makeCaPki, requireTools, run, runOk, type CaPki, type RunResult } from '../support/nbd-tools.js'

const TIMEOUT = 120_000
const SIZE = 1024 * 1024
const BLOCK = 4096

let dir: string
let pki: CaPki
/** qemu's tls-creds-psk wants a directory holding keys.psk. */
let pskDir: string
let pskFile: string
let wrongPskDir: string
let wrongPskFile: string
/** A key for an identity the server's psk file does not have. */
let unknownPskFile: string

before(async () => {
  await requireTools('nbdinfo', 'nbdsh', 'qemu-img', 'qemu-io', 'openssl')
  dir = await mkdtemp(join(tmpdir(), 'nbd-tls-auth-'))
  pki = await makeCaPki(join(dir, 'pki'))
  pskDir = join(dir, 'psk')
  wrongPskDir = join(dir, 'wrong-psk')
  await mkdir(pskDir)
  await mkdir(wrongPskDir)
  pskFile = join(pskDir, 'keys.psk')
  wrongPskFile = join(wrongPskDir, 'keys.psk')
  // Fixed keys: the test is about who gets in, not about key material.
  await writeFile(pskFile, `alice:${pattern(32, 1).toString('hex')}\n`)
  await writeFile(wrongPskFile, `alice:${pattern(32, 2).toString('hex')}\n`)
  unknownPskFile = join(dir, 'bob.psk')
  await writeFile(unknownPskFile, `bob:${pattern(32, 1).toString('hex')}\n`)
}, { timeout: TIMEOUT })

after(async () => {
  if (dir) await rm(dir, { recursive: true, force: true })
})

/** A server exporting 'sec' (1 MiB of a seeded pattern) under one TLS configuration. */
class Served {
  readonly server: TestServer
  readonly device: MemoryDevice
  private constructor(server: TestServer, device: MemoryDevice) {
    this.server = server
    this.device = device
  }

  static async start(tls: NbdTlsFiles, seed: number): Promise<Served> {
    const device = MemoryDevice.fromBytes(pattern(SIZE, seed))
    const server = await startTestServer({ exports: staticExports([{ name: 'sec', device, readOnly: false }]), tls })
    return new Served(server, device)
  }

  get port(): number {
    return this.server.port
  }

  /** Clients that entered transmission so far (the server logs each one). */
  servedCount(): number {
    return this.server.logs.filter((line) => line.includes(": serving 'sec'")).length
  }

  async bytes(): Promise<Buffer> {
    return Buffer.from(await this.device.read(0, SIZE))
  }

  async close(): Promise<void> {
    await this.server.close()
    assert.ok(logsAreClean(this.server.logs), this.server.logs.join('\n'))
  }
}

/** How one client reaches the server: a libnbd URI and, when qemu can speak it, qemu's --object. */
interface Client {
  readonly label: string
  readonly uri: (port: number) => string
  readonly qemuObject?: string
}

const psk = (label: string, file: () => string, user = 'alice'): Client => ({
  label,
  uri: (port) => `nbds://${user}@127.0.0.1:${port}/sec?tls-psk-file=${file()}`,
})
/** gnutls priority string that keeps qemu on TLS 1.2 (PSK there is a cipher suite, not a TLS 1.3 mode). */
const TLS12 = ',priority=NORMAL:-VERS-TLS1.3'
const qemuPsk = (label: string, keysDir: () => string, extra = ''): Client => ({
  label,
  uri: () => '',
  get qemuObject() {
    return `tls-creds-psk,id=tls0,dir=${keysDir()},username=alice,endpoint=client${extra}`
  },
})
/** libnbd with a certificates directory (ca-cert.pem, optionally client-cert.pem/client-key.pem). */
const x509 = (label: string, certDir: () => string): Client => ({
  label,
  uri: (port) => `nbds://127.0.0.1:${port}/sec?tls-certificates=${certDir()}`,
})
const qemuX509 = (label: string, certDir: () => string, extra = ''): Client => ({
  label,
  uri: () => '',
  get qemuObject() {
    return `tls-creds-x509,id=tls0,dir=${certDir()},endpoint=client${extra}`
  },
})

const CLIENTS = {
  psk: psk('libnbd with the right PSK', () => pskFile),
  wrongPsk: psk('libnbd with a wrong PSK', () => wrongPskFile),
  unknownUser: psk('libnbd with an identity not in the psk file', () => unknownPskFile, 'bob'),
  qemuPsk: qemuPsk('qemu with the right PSK', () => pskDir),
  qemuWrongPsk: qemuPsk('qemu with a wrong PSK', () => wrongPskDir),
  qemuPsk12: qemuPsk('qemu with the right PSK over TLS 1.2', () => pskDir, TLS12),
  qemuWrongPsk12: qemuPsk('qemu with a wrong PSK over TLS 1.2', () => wrongPskDir, TLS12),
  /** No PSK, no certificate, and it does not check the server either. */
  anonymous: { label: 'libnbd with no credentials', uri: (port: number) => `nbds://127.0.0.1:${port}/sec?tls-verify-peer=false` } as Client,
  plaintext: { label: 'libnbd without TLS', uri: (port: number) => `nbd://127.0.0.1:${port}/sec` } as Client,
  signed: x509('libnbd with a CA-signed client certificate', () => pki.clientDir),
  noCert: x509('libnbd with no client certificate', () => pki.noCertDir),
  selfSigned: x509('libnbd with a self-signed client certificate', () => pki.selfSignedDir),
  otherCa: x509('libnbd with a client certificate from another CA', () => pki.otherCaDir),
  qemuSigned: qemuX509('qemu with a CA-signed client certificate', () => pki.clientDir),
  qemuNoCert: qemuX509('qemu with no client certificate', () => pki.noCertDir),
  qemuSigned12: qemuX509('qemu with a CA-signed client certificate over TLS 1.2', () => pki.clientDir, TLS12),
  qemuNoCert12: qemuX509('qemu with no client certificate over TLS 1.2', () => pki.noCertDir, TLS12),
}

function qemuArgs(client: Client, port: number): string[] {
  return ['--object', client.qemuObject as string, '--image-opts', `driver=nbd,host=127.0.0.1,port=${port},export=sec,tls-creds=tls0`]
}

/** nbdsh connecting to `uri` itself: `nbdsh -u` refuses URIs that name local files (tls-psk-file, tls-certificates). */
function nbdshConnect(uri: string, script: string): Promise<RunResult> {
  return run('nbdsh', ['-c', `h.set_uri_allow_local_file(True)\nh.connect_uri(${JSON.stringify(uri)})\n${script}`])
}

let writeSeed = 100

/**
 * The client gets in: libnbd clients report TLS in nbdinfo and write a block through nbdsh that
 * lands on the export; qemu clients read the whole export with qemu-img.
 */
async function assertAdmitted(s: Served, client: Client): Promise<void> {
  if (client.qemuObject !== undefined) {
    const out = join(dir, 'read.raw')
    await runOk('qemu-img', ['convert', ...qemuArgs(client, s.port), '-O', 'raw', out])
    assert.ok((await readFile(out)).equals(await s.bytes()), `${client.label}: qemu-img read the export`)
    await rm(out)
    return
  }
  const uri = client.uri(s.port)
  const info = JSON.parse((await runOk('nbdinfo', ['--json', uri])).stdout)
  assert.equal(info.TLS, uri.startsWith('nbds://'), `${client.label}: TLS as expected`)
  const data = pattern(BLOCK, writeSeed++)
  const offset = (writeSeed % (SIZE / BLOCK)) * BLOCK
  const dataFile = join(dir, 'block.bin')
  await writeFile(dataFile, data)
  const r = await nbdshConnect(
    uri,
    `data = open(${JSON.stringify(dataFile)}, "rb").read()\nh.pwrite(data, ${offset})\nh.flush()\nassert h.pread(${BLOCK}, ${offset}) == data`,
  )
  assert.equal(r.code, 0, `${client.label}: nbdsh write and read back:\n${r.stderr}`)
  assert.ok(Buffer.from(await s.device.read(offset, BLOCK)).equals(data), `${client.label}: its write landed`)
}

/**
 * The client is refused: its write attempt fails, changes nothing, and it never reached
 * transmission. The server must have logged the refusal, so the client did not just give up on
 * its own; and every client refused here is admitted by some other configuration in this file,
 * so its credentials work where they should.
 */
async function assertRefused(s: Served, client: Client, why: RegExp): Promise<void> {
  const before = await s.bytes()
  const served = s.servedCount()
  const logged = s.server.logs.length
  const attempt: RunResult =
    client.qemuObject !== undefined
      ? await run('qemu-io', [...qemuArgs(client, s.port), '-c', `write -P 0xee 0 ${BLOCK}`])
      : await nbdshConnect(client.uri(s.port), `h.pwrite(b"\\xee" * ${BLOCK}, 0)\nh.flush()`)
  assert.notEqual(attempt.code, 0, `${client.label} must be refused:\n${attempt.stdout}${attempt.stderr}`)
  assert.ok((await s.bytes()).equals(before), `${client.label}: nothing was written`)
  assert.equal(s.servedCount(), served, `${client.label}: no connection reached transmission, so nothing was read`)
  const lines = s.server.logs.slice(logged)
  assert.ok(
    lines.some((l) => /TLS client refused: |refused: TLS is required/.test(l) && why.test(l)),
    `${client.label}: the server refused it for ${why}:\n${lines.join('\n')}\n${attempt.stderr}`,
  )
}

/** Why the server refused, as its log says. */
const WHY = {
  plaintext: /refused: TLS is required/,
  handshake: /TLS client refused: TLS handshake failed/,
  notPsk: /TLS client refused: client did not authenticate with a PSK/,
  /** OpenSSL's alert when a certificate was asked for; Node's code when PSK leaves the check to us. */
  noCert: /peer did not return a certificate|\(UNABLE_TO_GET_ISSUER_CERT\)/,
  selfSigned: /\(DEPTH_ZERO_SELF_SIGNED_CERT\)/,
  otherCa: /\(UNABLE_TO_VERIFY_LEAF_SIGNATURE\)/,
}

const files = (extra: Partial<NbdTlsFiles>): NbdTlsFiles => ({ mode: 'require', ...extra })
const cert = () => ({ certFile: pki.serverCert, keyFile: pki.serverKey })

describe('TLS authentication with real clients', () => {
  it('PSK only: only clients with a key from the psk file get in; plaintext is refused', { timeout: TIMEOUT }, async () => {
    const s = await Served.start(files({ pskFile }), 1)
    try {
      await assertAdmitted(s, CLIENTS.psk)
      await assertAdmitted(s, CLIENTS.qemuPsk)
      await assertAdmitted(s, CLIENTS.qemuPsk12)
      assert.ok(s.server.logs.some((l) => l.includes("TLSv1.2 established with psk identity 'alice'")), 'TLS 1.2 PSK was used')
      await assertRefused(s, CLIENTS.qemuWrongPsk12, WHY.handshake)
      await assertRefused(s, CLIENTS.wrongPsk, WHY.handshake)
      await assertRefused(s, CLIENTS.unknownUser, WHY.handshake)
      await assertRefused(s, CLIENTS.qemuWrongPsk, WHY.handshake)
      await assertRefused(s, CLIENTS.anonymous, WHY.handshake)
      await assertRefused(s, CLIENTS.plaintext, WHY.plaintext)
      assert.ok(s.server.logs.some((l) => /info nbd server: TLS require: admitting only TLS clients with a key from the psk file/.test(l)))
    } finally {
      await s.close()
    }
  })

  it('PSK and a server certificate, no CA: PSK clients get in; anonymous and certificate clients are refused', { timeout: TIMEOUT }, async () => {
    const s = await Served.start(files({ pskFile, ...cert() }), 2)
    try {
      await assertAdmitted(s, CLIENTS.psk)
      await assertAdmitted(s, CLIENTS.qemuPsk)
      await assertAdmitted(s, CLIENTS.qemuPsk12)
      assert.ok(s.server.logs.some((l) => l.includes("TLSv1.2 established with psk identity 'alice'")), 'TLS 1.2 PSK was used')
      await assertRefused(s, CLIENTS.qemuNoCert12, WHY.notPsk)
      // A certificate handshake completes (the server has a certificate), but proves nothing about
      // the client: without a CA, not even a signed client certificate counts.
      for (const c of [CLIENTS.anonymous, CLIENTS.noCert, CLIENTS.signed, CLIENTS.qemuSigned, CLIENTS.qemuNoCert]) {
        await assertRefused(s, c, WHY.notPsk)
      }
      await assertRefused(s, CLIENTS.wrongPsk, WHY.handshake)
      await assertRefused(s, CLIENTS.plaintext, WHY.plaintext)
    } finally {
      await s.close()
    }
  })

  it('PSK, a server certificate and a CA: PSK clients and CA-signed client certificates get in', { timeout: TIMEOUT }, async () => {
    const s = await Served.start(files({ pskFile, ...cert(), caFile: pki.caCert }), 3)
    try {
      await assertAdmitted(s, CLIENTS.psk)
      await assertAdmitted(s, CLIENTS.qemuPsk)
      await assertAdmitted(s, CLIENTS.signed)
      await assertAdmitted(s, CLIENTS.qemuSigned)
      await assertRefused(s, CLIENTS.noCert, WHY.noCert)
      await assertRefused(s, CLIENTS.qemuNoCert, WHY.noCert)
      await assertRefused(s, CLIENTS.anonymous, WHY.noCert)
      await assertRefused(s, CLIENTS.selfSigned, WHY.selfSigned)
      await assertRefused(s, CLIENTS.otherCa, WHY.otherCa)
      await assertRefused(s, CLIENTS.wrongPsk, WHY.handshake)
      await assertRefused(s, CLIENTS.plaintext, WHY.plaintext)
      assert.ok(s.server.logs.some((l) => l.includes("tls, psk identity 'alice'")), 'the log names the PSK identity')
      assert.ok(s.server.logs.some((l) => /tls, certificate 'CN=alice'/.test(l)), 'the log names the certificate')
    } finally {
      await s.close()
    }
  })

  it('X.509 without a CA: any TLS client gets in, as documented, and the server warns so; plaintext is refused', { timeout: TIMEOUT }, async () => {
    const s = await Served.start(files(cert()), 4)
    try {
      for (const c of [CLIENTS.noCert, CLIENTS.anonymous, CLIENTS.selfSigned, CLIENTS.otherCa, CLIENTS.signed, CLIENTS.qemuNoCert, CLIENTS.qemuNoCert12, CLIENTS.qemuSigned]) {
        await assertAdmitted(s, c)
      }
      await assertRefused(s, CLIENTS.plaintext, WHY.plaintext)
      assert.ok(
        s.server.logs.some((l) => /^warn nbd server: TLS require: clients are not authenticated; admitting any TLS client/.test(l)),
        s.server.logs.join('\n'),
      )
    } finally {
      await s.close()
    }
  })

  it('X.509 with a CA: client certificates are verified by default; no, self-signed and other-CA certificates are refused', { timeout: TIMEOUT }, async () => {
    const s = await Served.start(files({ ...cert(), caFile: pki.caCert }), 5)
    try {
      await assertAdmitted(s, CLIENTS.signed)
      await assertAdmitted(s, CLIENTS.qemuSigned)
      await assertAdmitted(s, CLIENTS.qemuSigned12)
      await assertRefused(s, CLIENTS.qemuNoCert12, WHY.noCert)
      await assertRefused(s, CLIENTS.noCert, WHY.noCert)
      await assertRefused(s, CLIENTS.qemuNoCert, WHY.noCert)
      await assertRefused(s, CLIENTS.anonymous, WHY.noCert)
      await assertRefused(s, CLIENTS.selfSigned, WHY.selfSigned)
      await assertRefused(s, CLIENTS.otherCa, WHY.otherCa)
      await assertRefused(s, CLIENTS.plaintext, WHY.plaintext)
      assert.ok(s.server.logs.some((l) => /info nbd server: TLS require: admitting only TLS clients with a certificate signed by the CA/.test(l)))
    } finally {
      await s.close()
    }
  })

  it('X.509 with a CA and verifyPeer false: client certificates are not checked', { timeout: TIMEOUT }, async () => {
    const s = await Served.start(files({ ...cert(), caFile: pki.caCert, verifyPeer: false }), 6)
    try {
      await assertAdmitted(s, CLIENTS.noCert)
      await assertAdmitted(s, CLIENTS.selfSigned)
      await assertRefused(s, CLIENTS.plaintext, WHY.plaintext)
    } finally {
      await s.close()
    }
  })

  it('tls allow with PSK: plaintext and PSK clients get in, a certificate-only TLS client does not', { timeout: TIMEOUT }, async () => {
    const s = await Served.start({ mode: 'allow', pskFile, ...cert() }, 7)
    try {
      await assertAdmitted(s, CLIENTS.plaintext)
      await assertAdmitted(s, CLIENTS.psk)
      await assertRefused(s, CLIENTS.anonymous, WHY.notPsk)
      assert.ok(s.server.logs.some((l) => /^warn nbd server: TLS allow: clients are not authenticated; .*any plaintext client/.test(l)))
    } finally {
      await s.close()
    }
  })

  it('configurations that cannot authenticate as asked are refused', async () => {
    const key = new Map([['alice', Buffer.alloc(32, 1)]])
    const refuse = (options: Parameters<typeof createTlsContext>[0], message: RegExp) =>
      assert.throws(() => createTlsContext(options), (err) => isSnapError(err, 'SNAP_BAD_ARGUMENT') && message.test(err.message))
    const [certPem, keyPem, caPem] = await Promise.all([readFile(pki.serverCert), readFile(pki.serverKey), readFile(pki.caCert)])
    refuse({ mode: 'require', cert: certPem, key: keyPem, verifyPeer: true }, /verifying client certificates needs a CA/)
    refuse({ mode: 'require', psk: key, ca: caPem }, /needs a server certificate/)
    assert.ok(createTlsContext({ mode: 'require', psk: key, cert: certPem, key: keyPem, ca: caPem, verifyPeer: false }))
  })
})
