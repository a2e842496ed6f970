/**
 * A resumed TLS session would skip both the PSK callback and client-certificate verification,
 * so the server resumes none (docs/security.md, TLS): a client holding the session of a verified
 * client's connection, over TLS 1.2 and 1.3, gets a full handshake and is judged afresh.
 */
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import tls from 'node:tls'
import { after, before, test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { staticExports } from '../../src/nbd/export.js'
import { makeCaPki, requireTools, type CaPki } from '../support/nbd-tools.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { startTestServer, type TestServer } from '../support/nbd-test-server.js'

const TIMEOUT = 60_000
const OPT_STARTTLS = 5
const OPT_LIST = 3
const REP_ACK = 1

let dir = ''
let pki: CaPki
let srv: TestServer

before(async () => {
  await requireTools('openssl')
  dir = await mkdtemp(join(tmpdir(), 'bs-tls-resume-'))
  pki = await makeCaPki(join(dir, 'pki'))
  const [cert, key, ca] = await Promise.all([readFile(pki.serverCert), readFile(pki.serverKey), readFile(pki.caCert)])
  srv = await startTestServer({
    exports: staticExports([{ name: 'd', device: new MemoryDevice(4096), readOnly: false }]),
    tls: { mode: 'require', cert, key, ca },
  })
}, { timeout: TIMEOUT })

after(async () => {
  await srv?.close()
  if (dir) await rm(dir, { recursive: true, force: true })
})

interface Attempt {
  /** Whether TLS resumed the offered session. */
  readonly reused: boolean
  /** Whether the server then answered an NBD option (the client was admitted). */
  readonly admitted: boolean
  /** The session to offer next time, if the server handed one out. */
  readonly session: Buffer | undefined
}

/** STARTTLS, a TLS handshake (offering `session`), then LIST; what came of it. */
async function attempt(version: tls.SecureVersion, clientDir: string | null, session?: Buffer): Promise<Attempt> {
  const c = await RawNbdClient.connect({ port: srv.port })
  await c.handshake()
  c.option(OPT_STARTTLS)
  assert.equal((await c.optionReplies())[0]!.type, REP_ACK)
  c.socket.removeAllListeners('data')
  const [ca, cert, key] = await Promise.all([
    readFile(pki.caCert),
    clientDir ? readFile(join(clientDir, 'client-cert.pem')) : undefined,
    clientDir ? readFile(join(clientDir, 'client-key.pem')) : undefined,
  ])
  let latest: Buffer | undefined
  const secure = tls.connect({
    socket: c.socket,
    ca,
    ...(cert && key ? { cert, key } : {}),
    ...(session ? { session } : {}),
    minVersion: version,
    maxVersion: version,
    servername: 'localhost',
  })
  secure.on('session', (s: Buffer) => (latest = s))
  secure.on('error', () => {})
  const connected = await new Promise<boolean>((resolve) => {
    secure.once('secureConnect', () => resolve(true))
    secure.once('close', () => resolve(false))
  })
  if (!connected) return { reused: false, admitted: false, session: latest }
  const reused = secure.isSessionReused()
  const t = RawNbdClient.wrap(secure)
  t.option(OPT_LIST)
  const admitted = await t.optionReplies().then(
    (replies) => replies[replies.length - 1]!.type === REP_ACK,
    () => false,
  )
  // A TLS 1.3 ticket arrives after the handshake; by now any would have.
  latest ??= secure.getSession()
  t.destroy()
  return { reused, admitted, session: latest }
}

test('a TLS session is never resumed: the next connection authenticates afresh', { timeout: TIMEOUT }, async () => {
  for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
    const first = await attempt(version, pki.clientDir)
    assert.deepEqual([first.reused, first.admitted], [false, true], `${version}: a client with a certificate from the CA gets in`)
    assert.ok(first.session, `${version}: the client has a session to offer`)
    const again = await attempt(version, pki.clientDir, first.session)
    assert.deepEqual([again.reused, again.admitted], [false, true], `${version}: the same client again: a full handshake`)
    const thief = await attempt(version, null, first.session)
    assert.deepEqual([thief.reused, thief.admitted], [false, false], `${version}: a client without a certificate offering that session is refused`)
  }
})
