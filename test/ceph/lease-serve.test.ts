/**
 * Issue 18 item 4 end to end: two `blocksnap serve` processes stand in for two hosts serving one
 * volume on Ceph RBD. They share the volume directory (as on a shared file system) but each has
 * its own state directory (a host's /var/lib/blocksnap) and NBD port.
 * - The second refuses (exit 4, naming the first's pid, pointing at --takeover) while the first
 *   lives; after kill -9 of the first it takes over and the data equals a byte-array model.
 * - The first SIGSTOPped, `serve --takeover` by the second, writes through the second, then
 *   SIGCONT: a write already sent to the first fails at its client, the first exits loudly, and
 *   the origin image (rbd export) equals the model, without any of the stale owner's writes.
 * Verdicts wait on observable states (log lines, exit codes, replies), with generous limits.
 */
import { after, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { CephCluster } from '../support/ceph.js'
import { freePort } from '../support/free-port.js'
import { run } from '../support/nbd-tools.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { ServeProcess } from '../support/serve-process.js'
import { cli, cliOk } from '../cli/helpers.js'

const MiB = 1024 * 1024
const VOLUME_BYTES = 4 * MiB
const LEASE = '2'
const NBD_CMD_WRITE = 1
const NBD_CMD_FLUSH = 3
const NBD_FLAG_FUA = 1

const cluster = await CephCluster.startForFile()
const T = cluster.dir
const savedStateDir = process.env['BLOCKSNAP_STATE_DIR']
const servers: ServeProcess[] = []

after(async () => {
  for (const s of servers) {
    if (s.alive() && s.pid !== undefined) {
      process.kill(s.pid, 'SIGCONT')
      process.kill(s.pid, 'SIGKILL')
      await s.exit
    }
  }
  if (savedStateDir === undefined) delete process.env['BLOCKSNAP_STATE_DIR']
  else process.env['BLOCKSNAP_STATE_DIR'] = savedStateDir
})

/** `serve VOL` as host `host`: its own state directory and port. */
async function serveAs(host: string, vol: string, extra: string[] = []): Promise<{ server: ServeProcess; port: number }> {
  const state = join(T, `state-${host}`)
  await mkdir(state, { recursive: true })
  process.env['BLOCKSNAP_STATE_DIR'] = state // inherited by the spawned serve
  const port = await freePort()
  const server = await ServeProcess.start([vol, '--listen', `127.0.0.1:${port}`, '--lease-seconds', LEASE, ...extra], 90_000)
  servers.push(server)
  return { server, port }
}

/** Writes `byte` over [offset, offset+length) through the server at `port`, flushed; updates the model. */
async function writeThrough(port: number, name: string, model: Buffer, offset: number, length: number, byte: number): Promise<void> {
  const r = await run('nbdsh', ['-u', `nbd://127.0.0.1:${port}/${name}`, '-c', `h.pwrite(bytes([${byte}]) * ${length}, ${offset}); h.flush()`])
  assert.equal(r.code, 0, r.stderr)
  model.fill(byte, offset, offset + length)
}

async function readThrough(port: number, name: string): Promise<Buffer> {
  const file = join(T, `read-${port}.raw`)
  const r = await run('nbdcopy', [`nbd://127.0.0.1:${port}/${name}`, file])
  assert.equal(r.code, 0, r.stderr)
  const { readFile } = await import('node:fs/promises')
  return readFile(file)
}

function assertEqualBytes(actual: Buffer, expected: Buffer, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`)
  const at = actual.findIndex((b, i) => b !== expected[i])
  assert.equal(at, -1, `${what}: first difference at byte ${at} (0x${actual[at]?.toString(16)} instead of 0x${expected[at]?.toString(16)})`)
}

/** How the request with `cookie` ended: 'acknowledged', 'error N', or 'connection closed'. */
async function writeOutcome(client: RawNbdClient, cookie: bigint): Promise<string> {
  for (;;) {
    let reply
    try {
      reply = await client.reply()
    } catch {
      return 'connection closed'
    }
    if (reply.cookie !== cookie) continue
    if (reply.error !== 0) return `error ${reply.error}`
    if (reply.flags & 1) return 'acknowledged' // the DONE chunk (a simple reply has it too)
  }
}

async function makeVolume(name: string): Promise<{ vol: string; model: Buffer }> {
  const address = await cluster.createImage(name, VOLUME_BYTES)
  const vol = join(T, name)
  process.env['BLOCKSNAP_STATE_DIR'] = join(T, 'state-admin')
  await cliOk(['create', vol, '--origin', address])
  return { vol, model: Buffer.alloc(VOLUME_BYTES) }
}

test('a second serve refuses while the first lives, and takes over after kill -9 of the first', async () => {
  const { vol, model } = await makeVolume('kvol')
  const a = await serveAs('a', vol)
  await writeThrough(a.port, 'kvol', model, 0, 256 * 1024, 0x41)
  await writeThrough(a.port, 'kvol', model, MiB, 64 * 1024, 0x42)

  // Host b: refused, naming host a's server, pointing at --takeover; host a is undisturbed.
  process.env['BLOCKSNAP_STATE_DIR'] = join(T, 'state-b')
  const port = await freePort()
  const refused = await cli(['serve', vol, '--listen', `127.0.0.1:${port}`, '--lease-seconds', LEASE], { timeoutMs: 90_000 })
  const stderr = refused.stderr.toString()
  assert.equal(refused.code, 4, stderr)
  assert.match(stderr, /blocksnap: error \[SNAP_BUSY\]: volume .*kvol is served by host \S+ \(pid (\d+)\)/)
  assert.equal(/\(pid (\d+)\)/.exec(stderr)?.[1], String(a.server.pid))
  assert.match(stderr, /--takeover/)
  assert.ok(a.server.alive())
  await writeThrough(a.port, 'kvol', model, 2 * MiB, 4096, 0x43)

  process.kill(a.server.pid!, 'SIGKILL')
  await a.server.exit
  const b = await serveAs('b', vol)
  assertEqualBytes(await readThrough(b.port, 'kvol'), model, 'reads through the new owner')
  await writeThrough(b.port, 'kvol', model, 128 * 1024, 512 * 1024, 0x44)
  process.kill(b.server.pid!, 'SIGTERM')
  assert.deepEqual(await b.server.exit, { code: 0, signal: null }, b.server.log)
  assertEqualBytes(await cluster.exportImage('kvol'), model, 'rbd export of the origin')
})

test('serve --takeover fences a stalled first serve: its late write fails at the client, it exits loudly, and none of its writes land', async () => {
  const { vol, model } = await makeVolume('svol')
  const a = await serveAs('a', vol)
  await writeThrough(a.port, 'svol', model, 0, MiB, 0x51)
  // A client of host a, connected before the stall; its write goes out while a is stopped.
  const client = await RawNbdClient.connect({ port: a.port })
  try {
    await client.handshake()
    await client.go('svol')
    process.kill(a.server.pid!, 'SIGSTOP')

    const b = await serveAs('b', vol, ['--takeover'])
    assert.match(b.server.log, /taking .*svol over from host \S+ \(pid \d+\): fencing it first/)
    assert.match(b.server.log, /fencing 127\.0\.0\.1:0\/\d+/)
    await writeThrough(b.port, 'svol', model, 512 * 1024, MiB, 0x52)

    // The stale owner's late write: sent now, read by a only once it runs again.
    const late = Buffer.alloc(64 * 1024, 0x99)
    client.request({ type: NBD_CMD_WRITE, flags: NBD_FLAG_FUA, cookie: 1, offset: 2 * MiB, length: late.length }, late)
    client.request({ type: NBD_CMD_FLUSH, cookie: 2, length: 0 })
    process.kill(a.server.pid!, 'SIGCONT')
    // The write's reply says error, or the connection drops: never a success. (The flush may
    // succeed: it vouches only for writes completed before it, and those landed before the fence.)
    const outcome = await writeOutcome(client, 1n)
    assert.notEqual(outcome, 'acknowledged', 'the stale owner acknowledged a write')
    const exit = await a.server.exit
    await a.server.closed
    assert.equal(exit.code, 4, a.server.log)
    assert.match(a.server.log, /blocksnap: error \[SNAP_BUSY\]: volume .*svol: lost its lease .*taken over by host \S+ \(pid (\d+)\)/)
    assert.equal(/taken over by host \S+ \(pid (\d+)\)/.exec(a.server.log)?.[1], String(b.server.pid))

    // The new owner serves on, undisturbed.
    assert.ok(b.server.alive())
    await writeThrough(b.port, 'svol', model, 3 * MiB, 4096, 0x53)
    assertEqualBytes(await readThrough(b.port, 'svol'), model, 'reads through the new owner')
    process.kill(b.server.pid!, 'SIGTERM')
    assert.deepEqual(await b.server.exit, { code: 0, signal: null }, b.server.log)
    assertEqualBytes(await cluster.exportImage('svol'), model, 'rbd export of the origin')
  } finally {
    client.destroy()
  }
})
