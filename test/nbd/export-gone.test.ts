/**
 * Issue 12 item 7: a snapshot export that goes away under its NBD clients (removed with --force,
 * handed to a merge, merged) answers every command on their connections — READ, WRITE,
 * WRITE_ZEROES, TRIM, FLUSH and BLOCK_STATUS — with ESHUTDOWN: never EIO (a media error to a
 * VM), never success, never the removed snapshot's old blocksnap:exceptions map. And removing
 * a snapshot (or merging it) while clients have it open is refused, naming the export and the
 * number of clients, unless forced.
 *
 * In process: a real Volume served by an NbdServer through VolumeExports, raw NBD clients.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { VolumeExports, EXCEPTIONS_CONTEXT } from '../../src/cli/volume-exports.js'
import { localOps } from '../../src/control/volume-ops.js'
import { isSnapError } from '../../src/errors.js'
import { NbdErrno } from '../../src/protocol/nbd/constants.js'
import { Volume } from '../../src/volume/volume.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { type TestServer, logsAreClean, startTestServer } from '../support/nbd-test-server.js'

const TIMEOUT = 60_000
const MiB = 1024 * 1024
const CMD = { READ: 0, WRITE: 1, FLUSH: 3, TRIM: 4, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const

let T = ''
let volume: Volume
let srv: TestServer

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-export-gone-'))
  await Volume.create(join(T, 'vm'), { sizeBytes: 4 * MiB })
  volume = await Volume.open(join(T, 'vm'))
  srv = await startTestServer({ exports: new VolumeExports([volume]) })
})

after(async () => {
  await srv?.close()
  await volume?.close()
  if (T) await rm(T, { recursive: true, force: true })
  assert.ok(logsAreClean(srv.logs), `logs have no stack traces:\n${srv.logs.join('\n')}`)
})

/** A snapshot `name` whose first MiB differs from the origin (so its exceptions map is not empty). */
async function snapshotWithExceptions(name: string): Promise<void> {
  await volume.createSnapshot(name)
  await volume.origin.write(new Uint8Array(MiB).fill(0x5a), 0)
  await volume.origin.flush() // the copies under write-back have landed: the table is complete
}

async function openClient(exportName: string): Promise<RawNbdClient> {
  const c = await RawNbdClient.connect({ port: srv.port })
  await c.handshake()
  await c.go(exportName, { structured: true, contexts: [EXCEPTIONS_CONTEXT] })
  return c
}

let cookie = 1

/** Sends one command and returns the errno of its reply (0: success), reading the whole reply. */
async function errnoOf(c: RawNbdClient, type: number, offset = 0, length = 4096): Promise<number> {
  const id = cookie++
  const payload = type === CMD.WRITE ? new Uint8Array(length).fill(7) : undefined
  c.request({ type, cookie: id, offset: type === CMD.FLUSH ? 0 : offset, length: type === CMD.FLUSH ? 0 : length }, payload)
  let error = 0
  for (;;) {
    const chunk = await c.reply()
    assert.equal(chunk.cookie, BigInt(id), 'reply cookie')
    if (chunk.error !== 0) error = chunk.error
    if (!chunk.structured || chunk.flags & 1) return error
  }
}

/** Every command a client may send, each answered ESHUTDOWN. */
async function assertAllShutdown(c: RawNbdClient, what: string): Promise<void> {
  for (const [name, type] of Object.entries(CMD)) {
    assert.equal(await errnoOf(c, type), NbdErrno.ESHUTDOWN, `${what}: ${name} must get ESHUTDOWN`)
  }
}

test('remove is refused while NBD clients have the snapshot open, naming the export and the count', { timeout: TIMEOUT }, async () => {
  await snapshotWithExceptions('r')
  const a = await openClient('vm@r')
  const b = await openClient('vm@r')
  // Both work while the snapshot is there.
  assert.equal(await errnoOf(a, CMD.READ), 0)
  assert.equal(await errnoOf(b, CMD.BLOCK_STATUS), 0)
  assert.equal(srv.server.clientsOf('vm@r'), 2)

  const ops = localOps(volume, srv.server)
  await assert.rejects(
    ops.remove('r'),
    (err: unknown) => isSnapError(err, 'SNAP_BUSY') && err.message === 'snapshot vm@r is open by 2 NBD clients (export vm@r); use --force',
  )
  assert.ok(volume.records.some((r) => r.name === 'r'), 'a refused remove keeps the snapshot')
  assert.equal(await errnoOf(a, CMD.READ), 0, 'a refused remove leaves the clients working')

  b.destroy()
  await new Promise<void>((resolve) => {
    // The server notices the closed socket on its own schedule: wait for the count, not a time.
    const check = () => (srv.server.clientsOf('vm@r') === 1 ? resolve() : setImmediate(check))
    check()
  })
  await assert.rejects(ops.remove('r'), /open by 1 NBD client \(export vm@r\); use --force$/)

  await ops.remove('r', { force: true })
  assert.ok(!volume.records.some((r) => r.name === 'r'), 'forced remove removes it')
  await assertAllShutdown(a, 'forced remove')
  assert.equal(srv.server.clientsOf('vm@r'), 0, 'a gone export has no clients')
  // A new snapshot under the same name is a new export: the old connection stays shut down.
  await volume.createSnapshot('r')
  await assertAllShutdown(a, 'after recreating the name')
  await volume.removeSnapshot('r')
  a.destroy()
})

test('BLOCK_STATUS never answers a removed snapshot\'s exceptions map', { timeout: TIMEOUT }, async () => {
  await snapshotWithExceptions('b')
  const c = await openClient('vm@b')
  c.request({ type: CMD.BLOCK_STATUS, cookie: 900, offset: 0, length: 2 * MiB })
  const before = await c.structuredReply()
  assert.equal(before.at(-1)?.error, 0)
  // The first MiB is in the COW: flag 1 on the first extent.
  assert.equal(before[0]!.data.readUInt32BE(8), 1, 'the map shows the exceptions while the snapshot exists')
  await volume.removeSnapshot('b')
  c.request({ type: CMD.BLOCK_STATUS, cookie: 901, offset: 0, length: 2 * MiB })
  const afterRemove = await c.structuredReply()
  assert.equal(afterRemove.length, 1, 'one error chunk, no extents')
  assert.equal(afterRemove[0]!.error, NbdErrno.ESHUTDOWN)
  c.destroy()
})

test('a snapshot that starts merging and then finishes: every command gets ESHUTDOWN, never EIO', { timeout: TIMEOUT }, async () => {
  await snapshotWithExceptions('m')
  const c = await openClient('vm@m')
  assert.equal(await errnoOf(c, CMD.READ), 0)
  // Held paused at its first step boundary, so the "merging" state is observed, not raced.
  const merge = await volume.startMerge('m', { maxStepChunks: 1 })
  await merge.pause()
  assert.equal(merge.state, 'paused')
  await assertAllShutdown(c, 'while merging')
  merge.resume()
  await merge.done
  assert.equal(merge.state, 'complete')
  await assertAllShutdown(c, 'after the merge')
  c.destroy()
})
