/**
 * `blocksnap serve` and signals (issue 13, item 5): HUP, INT, QUIT and TERM all drain, flush
 * and exit 0, releasing the volume lock and removing both sockets; further signals during the
 * shutdown are ignored; a stale `--socket` left by a killed server is reused, a live one is not.
 */
import assert from 'node:assert/strict'
import { access, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { type Server, createConnection, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { Volume } from '../../src/volume/volume.js'
import { ServeProcess } from '../support/serve-process.js'
import { assertError, cli } from './helpers.js'

const TIMEOUT = 60_000

let T = ''
let vol = ''
const servers = new Set<ServeProcess>()

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'bs-sig-'))
  vol = join(T, 'vol')
  await Volume.create(vol, { sizeBytes: 1024 * 1024 })
})

after(async () => {
  for (const s of servers) if (s.alive() && s.pid !== undefined) process.kill(s.pid, 'SIGKILL')
  await rm(T, { recursive: true, force: true })
})

const exists = (p: string) =>
  access(p).then(
    () => true,
    () => false,
  )

function listen(server: Server, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(path, () => resolve())
  })
}

/** A socket file nobody listens on, as a server killed with SIGKILL leaves behind. */
async function staleSocket(path: string): Promise<void> {
  const server = createServer()
  await listen(server, `${path}.tmp`)
  await rename(`${path}.tmp`, path)
  await new Promise<void>((resolve) => server.close(() => resolve()))
  await assert.rejects(
    new Promise((resolve, reject) => createConnection(path).once('connect', resolve).once('error', reject)),
    /ECONNREFUSED/,
  )
}

async function serve(sock: string): Promise<ServeProcess> {
  const s = await ServeProcess.start([vol, '--listen', '127.0.0.1:0', '--socket', sock])
  servers.add(s)
  return s
}

/** Exit 0 by itself, the lock released (the volume opens again), no socket left. */
async function assertCleanExit(s: ServeProcess, sock: string): Promise<void> {
  assert.deepEqual(await s.exit, { code: 0, signal: null }, `server exit:\n${s.log}`)
  await s.closed
  servers.delete(s)
  assert.match(s.log, /"msg":"stopped"/)
  assert.doesNotMatch(s.log, /"level":(50|60)/, `errors logged:\n${s.log}`)
  assert.equal(await exists(sock), false, 'the --socket file is removed')
  assert.equal(await exists(join(vol, 'control.sock')), false, 'the control socket is removed')
  const v = await Volume.open(vol) // the lock is released
  await v.close()
}

describe('serve: signals', () => {
  for (const signal of ['SIGHUP', 'SIGINT', 'SIGQUIT', 'SIGTERM'] as const) {
    it(`${signal} stops the server cleanly with exit 0`, { timeout: TIMEOUT }, async () => {
      const sock = join(T, `${signal}.sock`)
      // One run also starts over a stale --socket, as after a SIGKILL.
      if (signal === 'SIGHUP') await staleSocket(sock)
      const s = await serve(sock)
      assert.ok(await exists(sock))
      process.kill(s.pid as number, signal)
      await assertCleanExit(s, sock)
      assert.match(s.log, new RegExp(`"msg":"${signal}: stopping"`))
    })
  }

  it('signals that arrive while it stops are ignored', { timeout: TIMEOUT }, async () => {
    const sock = join(T, 'repeat.sock')
    const s = await serve(sock)
    const pid = s.pid as number
    // Stopped, the server receives all four; on SIGCONT they are delivered together, so
    // whichever it handles first starts the shutdown and the other three come in during it.
    process.kill(pid, 'SIGSTOP')
    for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT'] as const) process.kill(pid, signal)
    process.kill(pid, 'SIGCONT')
    await assertCleanExit(s, sock)
    assert.equal(s.log.match(/: stopping"/g)?.length, 1, s.log)
    assert.equal(s.log.match(/; ignored"/g)?.length, 3, s.log)
  })

  it('a --socket where a server listens is refused with one line and left alone', { timeout: TIMEOUT }, async () => {
    const sock = join(T, 'live.sock')
    // blocksnap's probe hangs up at once: its side of the connection may see a reset.
    const other = createServer((c) => c.on('error', () => {}).end('other\n'))
    await listen(other, sock)
    try {
      assertError(await cli(['serve', vol, '--listen', '127.0.0.1:0', '--socket', sock]), 4, /socket .*live\.sock is in use: another server listens on it/)
      const reply = await new Promise<string>((resolve, reject) => {
        const c = createConnection(sock)
        c.once('data', (d) => resolve(d.toString()))
        c.once('error', reject)
      })
      assert.equal(reply, 'other\n', 'the other server still answers')
    } finally {
      await new Promise<void>((resolve) => other.close(() => resolve()))
    }
  })

  it('a --socket path holding something other than a socket is refused, not deleted', { timeout: TIMEOUT }, async () => {
    const file = join(T, 'not-a-socket')
    await writeFile(file, 'precious')
    assertError(await cli(['serve', vol, '--listen', '127.0.0.1:0', '--socket', file]), 1, /not-a-socket exists and is not a socket/)
    assert.equal(await readFile(file, 'utf8'), 'precious')
  })
})
