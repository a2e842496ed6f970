import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import { WriteCombiner } from '../../../src/device/write-combiner.js'
import { isSnapError } from '../../../src/errors.js'
import { FaultyDevice } from '../../support/faulty-device.js'
import { Random } from '../../support/random.js'

/** Counts the writes that reach the device, and holds them until released. */
function counted(base: MemoryDevice) {
  const writes: Array<[number, number]> = []
  const device = new FaultyDevice(base)
  const writeThen = device.writeThen.bind(device)
  device.writeThen = (data, offset, fua, done) => {
    writes.push([offset, data.length])
    setTimeout(() => writeThen(data, offset, fua, done), 2)
  }
  return { device, writes }
}

test('write-combiner: a lone write goes out at once; neighbours queued behind it go out as one write', async () => {
  const base = new MemoryDevice(1 << 20)
  const { device, writes } = counted(base)
  const combiner = new WriteCombiner(device)
  const first = combiner.write(new Uint8Array(4096).fill(1), 0)
  assert.deepEqual(writes, [[0, 4096]], 'the first write must not wait for company')
  // Out of order, with a gap: two runs.
  const later = [3, 2, 1, 7, 8].map((i) => combiner.write(new Uint8Array(4096).fill(i + 10), i * 4096))
  assert.equal(writes.length, 1)
  await Promise.all([first, ...later])
  assert.deepEqual(writes, [[0, 4096], [4096, 3 * 4096], [7 * 4096, 2 * 4096]])
  assert.equal(combiner.savedWrites, 3)
  for (const i of [1, 2, 3, 7, 8]) assert.deepEqual(base.readSync(i * 4096, 4096), new Uint8Array(4096).fill(i + 10))
})

test('write-combiner: big writes go out alone and at once; merged writes stay under the cap', async () => {
  const { device, writes } = counted(new MemoryDevice(1 << 20))
  const combiner = new WriteCombiner(device, { maxPieceBytes: 8192, maxMergedBytes: 16384 })
  const jobs = [combiner.write(new Uint8Array(4096), 0), combiner.write(new Uint8Array(65536), 65536)]
  assert.equal(writes.length, 2)
  for (let i = 1; i <= 6; i++) jobs.push(combiner.write(new Uint8Array(4096), i * 4096))
  await Promise.all(jobs)
  assert.deepEqual(writes.slice(2), [[4096, 16384], [20480, 8192]])
})

test('write-combiner: a failed merged write fails every piece in it, and only those', async () => {
  const base = new MemoryDevice(1 << 20)
  const faulty = new FaultyDevice(base)
  faulty.setDelay(() => 2)
  const combiner = new WriteCombiner(faulty)
  const first = combiner.write(new Uint8Array(512).fill(1), 0)
  faulty.failWrites({ offset: 8192, length: 1 })
  const bad = [combiner.write(new Uint8Array(4096), 4096), combiner.write(new Uint8Array(4096), 8192)]
  const good = combiner.write(new Uint8Array(4096).fill(5), 65536)
  await first
  for (const p of bad) await assert.rejects(p, (err: unknown) => isSnapError(err, 'SNAP_IO'))
  await good
  assert.deepEqual(base.readSync(65536, 4096), new Uint8Array(4096).fill(5))
})

test('write-combiner: random non-overlapping writes all land with their bytes', async () => {
  for (const seed of [1, 2, 3]) {
    const random = new Random(seed)
    const base = new MemoryDevice(256 * 4096)
    const faulty = new FaultyDevice(base)
    faulty.setDelay(() => random.int(3))
    const combiner = new WriteCombiner(faulty)
    const slots = Array.from({ length: 256 }, (_, i) => i)
    const expected = new Uint8Array(256 * 4096)
    const jobs: Array<Promise<void>> = []
    while (slots.length > 0) {
      const slot = slots.splice(random.int(slots.length), 1)[0] as number
      const data = random.bytes(4096)
      expected.set(data, slot * 4096)
      jobs.push(combiner.write(data, slot * 4096))
      if (random.chance(0.2)) await new Promise((resolve) => setTimeout(resolve, random.int(3)))
    }
    await Promise.all(jobs)
    assert.deepEqual(base.readSync(0, expected.length), expected, `seed ${seed}`)
    assert.ok(combiner.savedWrites > 0, `seed ${seed}: nothing was ever merged`)
  }
})
