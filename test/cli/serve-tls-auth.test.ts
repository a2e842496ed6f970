/**
 * `blocksnap serve` TLS authentication options end to end: --tls-ca verifies client certificates
 * by default, --no-tls-verify-peer turns that off, PSK with a certificate admits only PSK clients,
 * a certificate without a CA logs a warning, the flags that cannot work are usage errors, and
 * --help says who is authenticated. Clients are libnbd's nbdinfo and nbdsh; which client
 * certificates each TLS setup admits in detail is test/nbd/tls-auth.test.ts's job.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { freePort } from '../support/free-port.js'
import { makeCaPki, requireTools, run, runOk, type CaPki } from '../support/nbd-tools.js'
import { ServeProcess } from '../support/serve-process.js'
import { assertError, cli, cliOk, ok, pattern } from './helpers.js'

const TIMEOUT = 120_000
const BLOCK = 4096
const CONTENT = pattern(BLOCK, 13)

let T: string
let vol: string
let pki: CaPki
let psk: string
const running = new Set<ServeProcess>()

before(async () => {
  await requireTools('nbdinfo', 'nbdsh', 'openssl')
  T = await mkdtemp(join(tmpdir(), 'blocksnap-serve-tls-'))
  vol = join(T, 'vol')
  await cliOk(['create', vol, '--size', '1M'])
  await cliOk(['write', vol, '--offset', '0'], { input: CONTENT })
  pki = await makeCaPki(join(T, 'pki'))
  psk = join(T, 'keys.psk')
  await writeFile(psk, `alice:${pattern(32, 5).toString('hex')}\n`)
}, { timeout: TIMEOUT })

after(async () => {
  for (const s of running) {
    if (s.pid !== undefined && s.alive()) {
      process.kill(s.pid, 'SIGKILL')
      await s.exit
    }
  }
  if (T) await rm(T, { recursive: true, force: true })
}, { timeout: TIMEOUT })

async function serve(extra: readonly string[]): Promise<ServeProcess & { port: number }> {
  const port = await freePort()
  const s = Object.assign(await ServeProcess.start([vol, '--listen', `127.0.0.1:${port}`, ...extra], 20_000), { port })
  running.add(s)
  return s
}

async function stop(s: ServeProcess): Promise<void> {
  process.kill(s.pid as number, 'SIGTERM')
  assert.deepEqual(await s.exit, { code: 0, signal: null }, s.log)
  running.delete(s)
}

const serverCert = () => ['--tls-cert', pki.serverCert, '--tls-key', pki.serverKey]
const certUri = (port: number, certDir: string) => `nbds://127.0.0.1:${port}/vol?tls-certificates=${certDir}`
const pskUri = (port: number) => `nbds://alice@127.0.0.1:${port}/vol?tls-psk-file=${psk}`
const anonymousUri = (port: number) => `nbds://127.0.0.1:${port}/vol?tls-verify-peer=false`

function nbdsh(uri: string, script: string) {
  // nbdsh -u refuses URIs naming local files (tls-certificates, tls-psk-file).
  return run('nbdsh', ['-c', `h.set_uri_allow_local_file(True)\nh.connect_uri(${JSON.stringify(uri)})\n${script}`])
}

/** The client reads the volume's first block and finds what was written before serve started. */
async function assertReads(uri: string, what: string): Promise<void> {
  const r = await nbdsh(uri, `import sys\nsys.stdout.write(h.pread(${BLOCK}, 0).hex())`)
  assert.equal(r.code, 0, `${what} gets in:\n${r.stderr}`)
  assert.equal(r.stdout, CONTENT.toString('hex'), `${what} reads the volume`)
}

/** The client's write fails; `reader` (an admitted client) then still finds the original block. */
async function assertRefused(s: ServeProcess, uri: string, reader: string, what: string): Promise<void> {
  // The server's own warning, one line per refused client (the client-error event repeats the text).
  const refusals = () => s.log.split('\n').filter((line) => line.includes('"component":"nbd"') && line.includes('TLS client refused')).length
  const before = refusals()
  const attempt = await nbdsh(uri, `h.pwrite(b"\\xee" * ${BLOCK}, 0)\nh.flush()`)
  assert.notEqual(attempt.code, 0, `${what} must be refused`)
  await assertReads(reader, `after ${what}, an admitted client`)
  assert.equal(refusals(), before + 1, `the server logged the refusal of ${what}:\n${s.log}`)
}

/** Pino JSON lines at warning level (40) whose message matches. */
function warned(s: ServeProcess, message: RegExp): boolean {
  return s.log.split('\n').some((line) => line.includes('"level":40') && message.test(line))
}

describe('serve TLS authentication', () => {
  it('--tls-ca: clients need a certificate the CA signed; no warning', { timeout: TIMEOUT }, async () => {
    const s = await serve([...serverCert(), '--tls-ca', pki.caCert])
    try {
      await assertReads(certUri(s.port, pki.clientDir), 'a CA-signed client')
      await assertRefused(s, certUri(s.port, pki.noCertDir), certUri(s.port, pki.clientDir), 'a client without a certificate')
      await assertRefused(s, certUri(s.port, pki.selfSignedDir), certUri(s.port, pki.clientDir), 'a self-signed client certificate')
      assert.match(s.log, /admitting only TLS clients with a certificate signed by the CA/)
      assert.equal(warned(s, /not authenticated/), false)
    } finally {
      await stop(s)
    }
  })

  it('--tls-ca with --no-tls-verify-peer, and a certificate alone: anyone gets in, with a startup warning', { timeout: TIMEOUT }, async () => {
    for (const extra of [['--tls-ca', pki.caCert, '--no-tls-verify-peer'], []]) {
      const s = await serve([...serverCert(), ...extra])
      try {
        await assertReads(certUri(s.port, pki.noCertDir), `a client without a certificate (${extra.join(' ') || 'no CA'})`)
        assert.ok(warned(s, /TLS require: clients are not authenticated/), s.log)
      } finally {
        await stop(s)
      }
    }
  })

  it('--tls-psk with a certificate: PSK clients get in, a client with neither key nor certificate does not', { timeout: TIMEOUT }, async () => {
    const s = await serve(['--tls-psk', psk, ...serverCert()])
    try {
      await assertReads(pskUri(s.port), 'a PSK client')
      const info = JSON.parse((await runOk('nbdinfo', ['--json', pskUri(s.port)])).stdout)
      assert.equal(info.TLS, true)
      await assertRefused(s, anonymousUri(s.port), pskUri(s.port), 'a client with no credentials')
      await assertRefused(s, certUri(s.port, pki.clientDir), pskUri(s.port), 'a certificate client without a CA to check it')
    } finally {
      await stop(s)
    }
  })

  it('flags that cannot authenticate anyone are usage errors; --help says who is authenticated', { timeout: TIMEOUT }, async () => {
    const listen = ['--listen', '127.0.0.1:0']
    assertError(await cli(['serve', vol, ...listen, ...serverCert(), '--tls-verify-peer']), 2, /--tls-verify-peer needs --tls-ca/)
    assertError(await cli(['serve', vol, ...listen, '--tls-psk', psk, '--tls-ca', pki.caCert]), 2, /--tls-ca needs --tls-cert/)
    const help = ok(await cli(['serve', '--help'])).stdout.toString('utf8')
    assert.match(help, /--tls-ca <FILE>/)
    assert.match(help, /--no-tls-verify-peer/)
    assert.match(help, /Who is authenticated/)
    assert.match(help, /--tls-cert\/--tls-key +NOBODY: any TLS client gets in/)
  })
})
