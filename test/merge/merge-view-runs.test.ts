/**
 * MergeView routes a write over unmerged chunks by run: one COW write (one tracked range) per
 * run of chunks consecutive in the COW outside every window, one held write per run inside a
 * window, instead of one piece per chunk. Checked against the bytes the COW must then hold.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { MergeView } from '../../src/merge/merge-view.js'
import { makeSnapshot, newStack } from '../support/engine-stack.js'
import { FaultyDevice } from '../support/faulty-device.js'
import { Random } from '../support/random.js'

const KiB = 1024
const CHUNK = 4 * KiB

async function setup() {
  const random = new Random(11)
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(256 * KiB)), null)
  const cowBase = new MemoryDevice(512 * KiB)
  const cow = new FaultyDevice(cowBase, 'cow')
  const writes: Array<[number, number]> = []
  const write = cow.write.bind(cow)
  cow.write = (data, offset, options) => {
    writes.push([offset, data.length])
    return write(data, offset, options)
  }
  const snap = makeSnapshot({ name: 'm', kind: 'P', chunkBytes: CHUNK, cowBytes: 512 * KiB }, cow)
  await stack.origin.addSnapshot(snap)
  // 16 chunks from 64 KiB saved in one go: consecutive on the origin and in the COW.
  await stack.origin.write(random.bytes(64 * KiB), 64 * KiB)
  await stack.origin.flush()
  assert.deepEqual(snap.exceptionRunsIn(0, 64).map((r) => [r.oldChunk, r.chunks]), [[16, 16]])
  writes.length = 0
  return { stack, snap, cowBase, writes, random }
}

test('merge view: a write over a run of unmerged chunks is one COW write and one tracked range', async () => {
  const { stack, snap, cowBase, writes, random } = await setup()
  const view = new MergeView(stack.origin, snap)
  const data = random.bytes(10 * CHUNK + 1024)
  const offset = 18 * CHUNK + 512
  const cowChunk = snap.table.lookup(18)
  await view.write(data, offset, false)
  assert.deepEqual(writes, [[cowChunk * CHUNK + 512, data.length]])
  assert.equal(view.counters.remappedWrites, 1)
  assert.deepEqual(cowBase.readSync(cowChunk * CHUNK + 512, data.length), data)
  assert.equal(view.trackedWrites.size, 0)
  await stack.origin.close()
})

test('merge view: a window inside the run splits it into COW, held and COW writes', async () => {
  const { stack, snap, cowBase, writes, random } = await setup()
  const view = new MergeView(stack.origin, snap)
  const window = view.publishWindow([{ firstChunk: 20, count: 4 }])
  const data = random.bytes(12 * CHUNK)
  const offset = 16 * CHUNK
  const written = view.write(data, offset, false)
  await new Promise((resolve) => setImmediate(resolve))
  const base = snap.table.lookup(16)
  assert.deepEqual(writes, [
    [base * CHUNK, 4 * CHUNK],
    [(base + 8) * CHUNK, 4 * CHUNK],
  ])
  assert.equal(view.counters.heldWrites, 1)
  assert.equal(view.counters.remappedWrites, 2)
  view.releaseWindow(window)
  await written
  // The held run went to the origin device once released.
  assert.deepEqual(stack.originBase.readSync(20 * CHUNK, 4 * CHUNK), data.subarray(4 * CHUNK, 8 * CHUNK))
  assert.deepEqual(cowBase.readSync(base * CHUNK, 4 * CHUNK), data.subarray(0, 4 * CHUNK))
  assert.deepEqual(cowBase.readSync((base + 8) * CHUNK, 4 * CHUNK), data.subarray(8 * CHUNK))
  await stack.origin.close()
})
