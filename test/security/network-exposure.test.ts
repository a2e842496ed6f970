/**
 * Where `serve` and `start` listen by default, and what leaving loopback costs (docs/security.md).
 * Each server runs in a network namespace of its own (`unshare --net`, as root), so it can use
 * the real default port 10809, or 0.0.0.0, without meeting or exposing anything; what it bound is
 * read from the kernel (/proc/PID/net/tcp, tcp6), not from its log.
 */
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { Volume } from '../../src/volume/volume.js'
import { BIN, REPO } from '../cli/helpers.js'

const TIMEOUT = 60_000

let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'bs-net-'))
})

after(async () => {
  await rm(T, { recursive: true, force: true })
})

/** The TCP sockets in LISTEN state of the network namespace `pid` is in, as "host:port". */
async function listeners(pid: number): Promise<string[]> {
  const out: string[] = []
  for (const file of ['tcp', 'tcp6']) {
    const lines = (await readFile(`/proc/${pid}/net/${file}`, 'utf8')).trim().split('\n').slice(1)
    for (const line of lines) {
      const [, local, , state] = line.trim().split(/\s+/)
      if (state !== '0A') continue // TCP_LISTEN
      const [hexHost, hexPort] = local!.split(':')
      out.push(`${file === 'tcp' ? ipv4(hexHost!) : `[${hexHost}]`}:${Number.parseInt(hexPort!, 16)}`)
    }
  }
  return out
}

/** /proc/net/tcp holds an IPv4 address as a little-endian u32 in hex. */
const ipv4 = (hex: string) => [6, 4, 2, 0].map((at) => Number.parseInt(hex.slice(at, at + 2), 16)).join('.')

/** Runs `blocksnap ARGS` in a network namespace of its own until it serves; stops it with SIGTERM. */
async function inOwnNetwork(args: readonly string[]): Promise<{ bound: string[]; log: string }> {
  // unshare execs the launcher, which execs node: one PID throughout, so SIGTERM reaches the server.
  const child = spawn('unshare', ['--net', BIN, ...args], { cwd: REPO, stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, BLOCKSNAP_LOG_LEVEL: 'info' } })
  let log = ''
  const exit = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)))
  await new Promise<void>((resolve, reject) => {
    child.stderr.on('data', (d: Buffer) => {
      log += d.toString('utf8')
      if (log.includes('"msg":"serving ')) resolve()
    })
    void exit.then((code) => reject(new Error(`exited with ${code} before serving:\n${log}`)))
  })
  const bound = await listeners(child.pid as number)
  child.kill('SIGTERM')
  assert.equal(await exit, 0, log)
  return { bound, log }
}

const warnings = (log: string) =>
  log
    .split('\n')
    .filter((line) => line.includes('"level":40'))
    .map((line) => (JSON.parse(line) as { msg: string }).msg)

describe('network exposure', () => {
  it('serve and start listen on 127.0.0.1:10809 and nowhere else unless told otherwise', { timeout: TIMEOUT }, async () => {
    const vol = join(T, 'vol')
    await Volume.create(vol, { sizeBytes: 1024 * 1024 })
    const served = await inOwnNetwork(['serve', vol])
    assert.deepEqual(served.bound, ['127.0.0.1:10809'], served.log)
    assert.deepEqual(warnings(served.log), [])
    const started = await inOwnNetwork(['start', '--dir', join(T, 'start', 'default')])
    assert.deepEqual(started.bound, ['127.0.0.1:10809'], started.log)
    assert.deepEqual(warnings(started.log), [])
  })

  it('listening beyond loopback without TLS required is warned about at startup', { timeout: TIMEOUT }, async () => {
    const vol = join(T, 'exposed')
    await Volume.create(vol, { sizeBytes: 1024 * 1024 })
    const exposed = await inOwnNetwork(['serve', vol, '--listen', '0.0.0.0:10809'])
    assert.deepEqual(exposed.bound, ['0.0.0.0:10809'], exposed.log)
    assert.deepEqual(warnings(exposed.log), [
      'nbd server: 0.0.0.0:10809 is reachable from other machines and TLS is not required: anyone who can connect reads and writes every export',
    ])
  })
})
