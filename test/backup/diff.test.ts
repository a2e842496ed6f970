/**
 * diffViews against a byte-array model: an origin with snapshots of different chunk sizes,
 * random writes on the origin and on the snapshots themselves (some rewriting the bytes already
 * there, so a chunk saved in both COWs with equal bytes must not be reported), then every pair
 * of views is diffed and the result checked for exactness at granule level:
 * - every byte where the two models differ lies in an extent;
 * - every granule inside an extent differs in at least one byte;
 * - extents are sorted, disjoint, not touching, granule aligned, and changedBytes is their sum.
 * Seeded; a failure names the seed.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import type { BlockDevice } from '../../src/device/block-device.js'
import { type DiffExtent, diffViews } from '../../src/backup/diff.js'
import type { Origin } from '../../src/snapshot/origin.js'
import type { Snapshot } from '../../src/snapshot/snapshot.js'
import { Random } from '../support/random.js'
import { addSnapshot, newStack } from '../support/engine-stack.js'

const SIZE = 96 * 1024 + 1536 // not a multiple of the larger chunk sizes: the last chunk is partial
const CHUNKS = [512, 1024, 4096, 16384]

/** Asserts that `extents` is exactly the granule-level difference of `x` and `y`. */
export function assertExactDiff(x: Uint8Array, y: Uint8Array, extents: readonly DiffExtent[], granule: number, what: string): void {
  let prevEnd = -1
  const covered = new Uint8Array(x.length)
  for (const e of extents) {
    assert.ok(e.length > 0, `${what}: empty extent`)
    assert.equal(e.offset % granule, 0, `${what}: extent at ${e.offset} is not aligned to ${granule}`)
    assert.ok(e.offset + e.length === x.length || e.length % granule === 0, `${what}: extent ${e.offset}+${e.length} is not whole granules`)
    assert.ok(e.offset > prevEnd, `${what}: extents out of order, overlapping or touching at ${e.offset}`)
    assert.ok(e.offset + e.length <= x.length, `${what}: extent beyond the end`)
    prevEnd = e.offset + e.length
    for (let g = e.offset; g < e.offset + e.length; g += granule) {
      const end = Math.min(g + granule, x.length)
      assert.notEqual(Buffer.compare(x.subarray(g, end), y.subarray(g, end)), 0, `${what}: granule at ${g} is reported but does not differ`)
      covered.fill(1, g, end)
    }
  }
  for (let i = 0; i < x.length; i++) {
    if (x[i] !== y[i] && covered[i] !== 1) assert.fail(`${what}: byte ${i} differs but lies in no extent`)
  }
}

interface World {
  readonly origin: Origin
  readonly views: Map<string, Snapshot | Origin>
  readonly model: Map<string, Uint8Array>
}

async function randomWorld(seed: number): Promise<World> {
  const rnd = new Random(seed)
  const stack = newStack(new MemoryDevice(SIZE), null)
  const model = new Map<string, Uint8Array>([['origin', new Uint8Array(SIZE)]])
  const views = new Map<string, Snapshot | Origin>([['origin', stack.origin]])
  const write = async (view: string, dev: BlockDevice): Promise<void> => {
    const m = model.get(view) as Uint8Array
    const length = 1 + rnd.int(rnd.chance(0.5) ? 600 : 20000)
    const offset = rnd.int(SIZE - length + 1)
    // A quarter of the writes put back what is there already: exceptions without a difference.
    const data = rnd.chance(0.25) ? m.slice(offset, offset + length) : rnd.bytes(length)
    await dev.write(data, offset)
    m.set(data, offset)
  }
  let n = 0
  for (let step = 0; step < 40; step++) {
    if (step % 8 === 0 && n < 4) {
      const name = `s${n}`
      const chunkBytes = CHUNKS[(n + rnd.int(CHUNKS.length)) % CHUNKS.length] as number
      const snap = await addSnapshot(stack, { name, kind: rnd.chance(0.5) ? 'P' : 'N', chunkBytes, cowBytes: 4 * SIZE + 64 * 1024 }, null)
      views.set(name, snap)
      model.set(name, (model.get('origin') as Uint8Array).slice())
      n++
    }
    const target = rnd.chance(0.25) && n > 0 ? `s${rnd.int(n)}` : 'origin'
    await write(target, views.get(target) as BlockDevice)
  }
  return { origin: stack.origin, views, model }
}

test('diff: exact at granule level for every pair of views (snapshots of different chunk sizes, the origin, writes on snapshots)', async () => {
  for (let seed = 1; seed <= 6; seed++) {
    const world = await randomWorld(seed)
    const names = [...world.views.keys()]
    for (const a of names) {
      for (const b of names) {
        const va = world.views.get(a) as Snapshot | Origin
        const vb = world.views.get(b) as Snapshot | Origin
        const { granularityBytes, extents } = await diffViews(va, vb, SIZE)
        const chunkOf = (v: Snapshot | Origin) => ('chunkBytes' in v ? v.chunkBytes : Infinity)
        const expectedGranule = Math.min(chunkOf(va), chunkOf(vb))
        assert.equal(granularityBytes, expectedGranule === Infinity ? 512 : expectedGranule)
        assertExactDiff(world.model.get(a) as Uint8Array, world.model.get(b) as Uint8Array, extents, granularityBytes, `seed ${seed} ${a}->${b}`)
      }
    }
    await world.origin.close()
  }
})

test('diff: a chunk saved in both COWs with equal bytes is compared, not assumed changed', async () => {
  const stack = newStack(new MemoryDevice(64 * 1024), null)
  const a = await addSnapshot(stack, { name: 'a', kind: 'P', chunkBytes: 4096, cowBytes: 256 * 1024 }, null)
  const b = await addSnapshot(stack, { name: 'b', kind: 'P', chunkBytes: 1024, cowBytes: 256 * 1024 }, null)
  // Both snapshots save chunk 0 (all zeros) and chunk 2 (zeros), the views stay equal.
  await stack.origin.write(new Uint8Array(100).fill(7), 10)
  await stack.origin.write(new Uint8Array(100).fill(9), 8192)
  await stack.origin.flush() // the copies of held writes land
  assert.ok(a.exceptionRanges().length > 0 && b.exceptionRanges().length > 0, 'both COWs hold exceptions')
  assert.deepEqual((await diffViews(a, b, 64 * 1024)).extents, [])
  // The origin differs from both only in the two granules written.
  assert.deepEqual((await diffViews(b, stack.origin, 64 * 1024)).extents, [
    { offset: 0, length: 1024 },
    { offset: 8192, length: 1024 },
  ])
  await stack.origin.close()
})

test('Snapshot.exceptionRanges: sorted, merged ranges of the origin chunks with exceptions', async () => {
  const stack = newStack(new MemoryDevice(4096 * 1024), null)
  const s = await addSnapshot(stack, { name: 's', kind: 'N', chunkBytes: 4096, cowBytes: 8 * 1024 * 1024 }, null)
  const rnd = new Random(99)
  const touched = new Set<number>()
  for (let i = 0; i < 300; i++) {
    const chunk = rnd.int(1024)
    touched.add(chunk)
    await stack.origin.write(new Uint8Array([1]), chunk * 4096 + rnd.int(4096))
  }
  // Chunks 255, 256, 257 straddle a group boundary of the table: still one range.
  for (const c of [255, 256, 257]) {
    touched.add(c)
    await stack.origin.write(new Uint8Array([1]), c * 4096)
  }
  await stack.origin.flush() // the copies of held writes land
  const expected: Array<{ startChunk: number; endChunk: number }> = []
  for (const c of [...touched].sort((x, y) => x - y)) {
    const last = expected[expected.length - 1]
    if (last && last.endChunk === c) last.endChunk++
    else expected.push({ startChunk: c, endChunk: c + 1 })
  }
  assert.deepEqual(s.exceptionRanges(), expected)
  await stack.origin.close()
})
