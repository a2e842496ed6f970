/**
 * PersistentStore and TransientStore: the shared conformance suite, then the persistent store's
 * on-disk behaviour checked byte for byte against an independently built kernel image
 * (reference §2, §3, invariants 11–17, 19, 21, 28, 43), crash cuts and grow-on-demand COWs.
 */
import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { isSnapError } from '../../../src/errors.js'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import type { SnapErrorCode } from '../../../src/errors.js'
import type { ExceptionStore, PreparedException } from '../../../src/store/exception-store.js'
import { PersistentStore } from '../../../src/store/persistent-store.js'
import { TransientStore } from '../../../src/store/transient-store.js'
import { expectedChunk, runExceptionStoreSuite } from '../../conformance/exception-store.suite.js'
import { areaLocation, buildArea, buildCow, buildHeader, nthDataChunk } from '../../support/byte-builder.js'
import { type CrashEvent, CrashRecorder } from '../../support/crash-recorder.js'
import { FaultyDevice } from '../../support/faulty-device.js'
import { Random } from '../../support/random.js'

runExceptionStoreSuite('persistent-store', (cow, chunkBytes) => new PersistentStore(cow, { chunkBytes }), { persistent: true })
runExceptionStoreSuite('transient-store', (cow, chunkBytes) => new TransientStore(cow, { chunkBytes }), { persistent: false })

const CHUNK = 512 // E = 32, stride 33
const E = CHUNK / 16

type Pair = [number, number]

async function rejectsCode(promise: Promise<unknown>, code: SnapErrorCode): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.equal((err as { code?: unknown }).code, code)
    return true
  })
}

async function load(cow: MemoryDevice | FaultyDevice, chunkBytes = CHUNK): Promise<{ store: PersistentStore; table: Pair[]; valid: boolean }> {
  const store = new PersistentStore(cow, { chunkBytes })
  const table: Pair[] = []
  const { valid } = await store.readMetadata((o, n) => table.push([o, n]))
  return { store, table, valid }
}

/** Prepares and commits `olds` as one batch; returns the allocated pairs in allocation order. */
async function commitBatch(store: ExceptionStore, olds: number[]): Promise<Pair[]> {
  const prepared = olds.map((o) => store.prepareException(o))
  const results = await Promise.all(prepared.map((e) => store.commitException(e, true)))
  assert.ok(results.every((ok) => ok), 'every commit succeeded')
  return prepared.map((e) => [e.oldChunk, e.newChunk])
}

function isAreaWrite(event: CrashEvent, chunkBytes: number): boolean {
  if (event.kind !== 'write' || event.offset === undefined) return false
  const stride = chunkBytes / 16 + 1
  const chunk = event.offset / chunkBytes
  return Number.isInteger(chunk) && chunk % stride === 1 && event.length === chunkBytes
}

const nonZero = (data: Uint8Array | undefined) => data !== undefined && data.some((b) => b !== 0)

describe('persistent-store: on-disk format', () => {
  it('persistent-store: a fresh COW gets the golden header and a zero area 0 (invariant 9)', async () => {
    const cow = new MemoryDevice(16 * 4096)
    cow.writeSync(new Uint8Array(16 * 4096).fill(0), 0)
    cow.writeSync(new Uint8Array(4096).fill(0x5a), 4096) // stale area 0 must be zeroed
    const { table, valid } = await load(cow, 4096)
    assert.equal(valid, true)
    assert.deepEqual(table, [])
    assert.deepEqual(cow.readSync(0, 4096), buildHeader({ chunkBytes: 4096 }))
    assert.deepEqual(cow.readSync(4096, 4096), new Uint8Array(4096))
  })

  it('persistent-store: on-disk bytes equal an independently built image (invariant 11)', async () => {
    const cowBytes = 160 * CHUNK
    const cow = new MemoryDevice(cowBytes)
    const { store } = await load(cow)
    const random = new Random(11)
    const expected: Pair[] = []
    for (let batch = 0; batch < 12; batch++) {
      const olds = Array.from({ length: 1 + random.int(9) }, () => random.int(1_000_000))
      expected.push(...(await commitBatch(store, olds)))
    }
    expected.forEach(([, n], i) => assert.equal(n, nthDataChunk(CHUNK, i)))
    assert.deepEqual(cow.readSync(0, cowBytes), buildCow({ chunkBytes: CHUNK, cowBytes, entries: expected }))
  })

  it('persistent-store: after E exceptions area 1 is zeroed and area 0 is full (invariant 12)', async () => {
    const cowBytes = 80 * CHUNK
    const base = new MemoryDevice(cowBytes)
    // Garbage where area 1 will be: the store must zero it before area 0 fills.
    base.writeSync(new Uint8Array(CHUNK).fill(0xee), areaLocation(CHUNK, 1) * CHUNK)
    const { store } = await load(base)
    const pairs: Pair[] = []
    for (let i = 0; i < E - 1; i++) pairs.push(...(await commitBatch(store, [i + 100])))
    assert.ok(base.readSync(areaLocation(CHUNK, 1) * CHUNK, CHUNK).every((b) => b === 0xee), 'area 1 untouched before area 0 fills')
    pairs.push(...(await commitBatch(store, [999])))
    assert.deepEqual(base.readSync(areaLocation(CHUNK, 1) * CHUNK, CHUNK), new Uint8Array(CHUNK))
    assert.deepEqual(base.readSync(areaLocation(CHUNK, 0) * CHUNK, CHUNK), buildArea(CHUNK, pairs))
    assert.equal(store.prepareException(5).newChunk, E + 3)
  })

  it('persistent-store: reopening reproduces the same map and usage (invariant 13)', async () => {
    const cow = new MemoryDevice(200 * CHUNK)
    const { store } = await load(cow)
    const random = new Random(13)
    const expected: Pair[] = []
    for (let batch = 0; batch < 20; batch++) {
      expected.push(...(await commitBatch(store, Array.from({ length: 1 + random.int(8) }, () => random.int(5000)))))
    }
    const usage = store.usage()
    const again = await load(cow)
    assert.equal(again.valid, true)
    assert.deepEqual(again.table, expected)
    assert.deepEqual(again.store.usage(), usage)
    // Allocation continues where the first instance stopped.
    const next = again.store.prepareException(1)
    assert.equal(next.newChunk, expectedChunk(true, CHUNK, expected.length))
  })

  it('persistent-store: reopening exactly at an area boundary continues after the next area', async () => {
    const cow = new MemoryDevice(100 * CHUNK)
    const { store } = await load(cow)
    const expected = await commitBatch(store, Array.from({ length: E }, (_, i) => i))
    const again = await load(cow)
    assert.deepEqual(again.table, expected)
    assert.deepEqual(again.store.usage(), store.usage())
    assert.equal(again.store.prepareException(0).newChunk, E + 3)
  })

  it('persistent-store: the header chunk size overrides the option (invariant 14)', async () => {
    const cow = MemoryDevice.fromBytes(buildCow({ chunkBytes: 8192, cowBytes: 32 * 8192, entries: [[7, 2]] }))
    const { store, table, valid } = await load(cow, 4096)
    assert.equal(valid, true)
    assert.equal(store.chunkBytes, 8192)
    assert.deepEqual(table, [[7, 2]])
    assert.deepEqual(store.usage(), { allocatedSectors: 3 * 16, totalSectors: 32 * 16, metadataSectors: 2 * 16 })
    assert.equal(store.prepareException(8).newChunk, 3)
  })

  it('persistent-store: an invalid header chunk size fails the load', async () => {
    const cow = MemoryDevice.fromBytes(buildCow({ chunkBytes: 4096, chunkSectors: 3, cowBytes: 16 * 4096, entries: [] }))
    await rejectsCode(load(cow, 4096), 'SNAP_BAD_CHUNK_SIZE')
  })

  it('persistent-store: bad magic, bad version and valid=0 (invariant 15)', async () => {
    const bytes = (spec: { magic?: number; version?: number; valid?: number }) =>
      MemoryDevice.fromBytes(buildCow({ chunkBytes: CHUNK, cowBytes: 40 * CHUNK, entries: [[1, 2]], ...spec }))
    await rejectsCode(load(bytes({ magic: 0x70416e54 })), 'SNAP_CORRUPT_METADATA')
    await rejectsCode(load(bytes({ version: 2 })), 'SNAP_BAD_FORMAT_VERSION')
    await rejectsCode(load(bytes({ version: 0 })), 'SNAP_BAD_FORMAT_VERSION')
    const invalid = await load(bytes({ valid: 0 }))
    assert.equal(invalid.valid, false)
    assert.equal(invalid.store.valid, false)
    assert.deepEqual(invalid.table, [], 'no areas are read for an invalid snapshot')
  })

  it('persistent-store: a full area followed by an area beyond the device end is corrupt (invariant 16)', async () => {
    const entries: Pair[] = Array.from({ length: E }, (_, i) => [i, nthDataChunk(CHUNK, i)])
    const full = buildCow({ chunkBytes: CHUNK, cowBytes: (E + 2) * CHUNK, entries })
    // Area 1 would be chunk E + 2: the device ends just before it.
    await rejectsCode(load(MemoryDevice.fromBytes(full)), 'SNAP_CORRUPT_METADATA')
    // One chunk more and it loads (area 1 reads as an empty terminator area).
    const bigger = new Uint8Array((E + 3) * CHUNK)
    bigger.set(full)
    const ok = await load(MemoryDevice.fromBytes(bigger))
    assert.deepEqual(ok.table, entries)
  })

  it('persistent-store: an unreadable area fails the load', async () => {
    const cow = new FaultyDevice(MemoryDevice.fromBytes(buildCow({ chunkBytes: CHUNK, cowBytes: 40 * CHUNK, entries: [[1, 2]] })))
    cow.failReads({ offset: CHUNK, length: CHUNK })
    await assert.rejects(load(cow))
  })

  it('persistent-store: a COW too small for header and area 0 is refused', async () => {
    await rejectsCode(load(new MemoryDevice(CHUNK)), 'SNAP_NO_SPACE')
    await rejectsCode(load(new MemoryDevice(100)), 'SNAP_CORRUPT_METADATA')
  })
})

describe('persistent-store: commit ordering and batching', () => {
  it('persistent-store: every area write with entries comes after a flush and is followed by one (invariant 17)', async () => {
    const recorder = new CrashRecorder()
    const cow = recorder.device('cow', new MemoryDevice(200 * CHUNK))
    const store = new PersistentStore(cow, { chunkBytes: CHUNK })
    await store.readMetadata(() => {})
    const random = new Random(17)
    for (let batch = 0; batch < 25; batch++) {
      const prepared = Array.from({ length: 1 + random.int(6) }, () => store.prepareException(random.int(1000)))
      await Promise.all(prepared.slice().reverse().map((e) => store.commitException(e, true)))
    }
    const events = recorder.events()
    let entryWrites = 0
    events.forEach((event, i) => {
      if (!isAreaWrite(event, CHUNK)) return
      assert.equal(events[i + 1]?.kind, 'flush', `area write at event ${i} is followed by a flush`)
      if (!nonZero(event.data)) return // zeroing of the next area / area 0 at creation
      entryWrites++
      assert.equal(events[i - 1]?.kind, 'flush', `area write at event ${i} is preceded by a flush`)
    })
    assert.ok(entryWrites >= 25, `saw ${entryWrites} area writes`)
  })

  it('persistent-store: a stream of batches costs one flush per batch: each flush follows one batch\'s area write and the next batch\'s data', async () => {
    const recorder = new CrashRecorder()
    const cow = recorder.device('cow', new MemoryDevice(200 * CHUNK))
    const store = new PersistentStore(cow, { chunkBytes: CHUNK })
    await store.readMetadata(() => {})
    // Every flush waits until the test lets it go, so the next batch commits while it is held.
    let held: (() => void) | null = null
    const flush = cow.flush.bind(cow)
    cow.flush = async () => {
      await new Promise<void>((resolve) => (held = resolve))
      return flush()
    }
    const untilHeld = async (): Promise<() => void> => {
      for (let i = 0; i < 1000 && held === null; i++) await new Promise((resolve) => setImmediate(resolve))
      const release = held
      assert.ok(release !== null, 'a flush is waiting')
      held = null
      return release
    }
    const start = recorder.length
    const batches = 6
    const answered: number[] = []
    const commits: Array<Promise<boolean>> = []
    const commitBatch = (k: number): void => {
      const e = store.prepareException(1000 + k)
      commits.push(store.commitException(e, true).then((ok) => (answered.push(k), ok)))
    }
    commitBatch(0)
    for (let k = 1; k < batches; k++) {
      const release = await untilHeld()
      commitBatch(k) // recorded while the flush is held: it joins the next round
      release()
      await untilHeld().then((next) => {
        // Batch k - 1's area went out in this round, before its flush: nothing of it is answered yet.
        assert.deepEqual(answered, Array.from({ length: Math.max(0, k - 1) }, (_, i) => i), `before round ${k + 1} flushes, batches 0..${k - 2} are answered`)
        held = next
      })
    }
    for (let rounds = 0; answered.length < batches; rounds++) {
      assert.ok(rounds < 4, 'the last batches end within two more rounds')
      ;(await untilHeld())()
      for (let i = 0; i < 20; i++) await new Promise((resolve) => setImmediate(resolve))
    }
    assert.deepEqual(await Promise.all(commits), new Array<boolean>(batches).fill(true))
    assert.deepEqual(answered, Array.from({ length: batches }, (_, i) => i), 'answered in commit order')
    const events = recorder.events().slice(start)
    const flushes = events.filter((e) => e.kind === 'flush').length
    const entryWrites = events.filter((e) => isAreaWrite(e, CHUNK) && nonZero(e.data)).length
    assert.equal(entryWrites, batches, 'one area write per batch')
    assert.equal(flushes, batches + 1, `${batches} batches, ${flushes} flushes (two per batch without the shared rounds)`)
  })

  it('persistent-store: one batch of 5 commits writes the area exactly once (invariant 21)', async () => {
    const recorder = new CrashRecorder()
    const cow = recorder.device('cow', new MemoryDevice(64 * CHUNK))
    const store = new PersistentStore(cow, { chunkBytes: CHUNK })
    await store.readMetadata(() => {})
    const start = recorder.length
    await commitBatch(store, [1, 2, 3, 4, 5])
    const areaWrites = recorder.events().slice(start).filter((e) => isAreaWrite(e, CHUNK))
    assert.equal(areaWrites.length, 1)
  })

  it('persistent-store: no area write while an allocated exception is outstanding (invariant 21)', async () => {
    const recorder = new CrashRecorder()
    const cow = recorder.device('cow', new MemoryDevice(64 * CHUNK))
    const store = new PersistentStore(cow, { chunkBytes: CHUNK })
    await store.readMetadata(() => {})
    const start = recorder.length
    const prepared = [1, 2, 3, 4, 5].map((o) => store.prepareException(o))
    const settled: boolean[] = []
    const first = prepared.slice(0, 4).map((e) => store.commitException(e, true).then((ok) => settled.push(ok)))
    for (let i = 0; i < 20; i++) await new Promise((resolve) => setImmediate(resolve))
    assert.equal(recorder.events().slice(start).filter((e) => isAreaWrite(e, CHUNK)).length, 0)
    assert.deepEqual(settled, [], 'nothing settles before the batch is written')
    const last = store.commitException(prepared[4] as PreparedException, true)
    await Promise.all([...first, last])
    assert.deepEqual(settled, [true, true, true, true])
    assert.equal(await last, true)
    assert.equal(recorder.events().slice(start).filter((e) => isAreaWrite(e, CHUNK)).length, 1)
  })

  it('persistent-store: a filling area is written even while exceptions are outstanding', async () => {
    const cow = new MemoryDevice(100 * CHUNK)
    const { store } = await load(cow)
    const prepared = Array.from({ length: E + 3 }, (_, i) => store.prepareException(i))
    const results = await Promise.all(prepared.slice(0, E).map((e) => store.commitException(e, true)))
    assert.ok(results.every((ok) => ok), 'full area settles without waiting for the rest')
    const rest = await Promise.all(prepared.slice(E).map((e) => store.commitException(e, true)))
    assert.ok(rest.every((ok) => ok))
  })

  it('persistent-store: a metadata write failure fails the whole batch and invalidates (invariant 19)', async () => {
    const base = new MemoryDevice(64 * CHUNK)
    const cow = new FaultyDevice(base)
    const { store } = await load(cow)
    const before = await commitBatch(store, [1, 2])
    cow.failWrites({ offset: areaLocation(CHUNK, 0) * CHUNK, length: CHUNK })
    const prepared = [3, 4, 5].map((o) => store.prepareException(o))
    const results = await Promise.all(prepared.map((e) => store.commitException(e, true)))
    assert.deepEqual(results, [false, false, false])
    assert.equal(store.valid, false)
    cow.clearFaults()
    assert.equal(await store.commitException(store.prepareException(6), true), false)
    // Nothing after the failure reached the disk: a reload sees the earlier batch only.
    const again = await load(base)
    assert.deepEqual(again.table, before)
  })

  it('persistent-store: a failed preflush fails the batch too', async () => {
    const cow = new FaultyDevice(new MemoryDevice(64 * CHUNK))
    const { store } = await load(cow)
    cow.failFlushes(1)
    const results = await Promise.all([1, 2].map((o) => store.prepareException(o)).map((e) => store.commitException(e, true)))
    assert.deepEqual(results, [false, false])
    assert.equal(store.valid, false)
  })

  it('persistent-store: failing to zero the next area invalidates the store', async () => {
    const cow = new FaultyDevice(new MemoryDevice(100 * CHUNK))
    const { store } = await load(cow)
    cow.failWrites({ offset: areaLocation(CHUNK, 1) * CHUNK, length: CHUNK })
    const results = await commitAllOf(store, Array.from({ length: E }, (_, i) => i))
    assert.ok(results.every((ok) => !ok))
    assert.equal(store.valid, false)
  })

  it('persistent-store: dropSnapshot writes valid=0 and a new store reads {valid:false} (invariant 28)', async () => {
    const cow = new MemoryDevice(64 * CHUNK)
    const { store } = await load(cow)
    await commitBatch(store, [1, 2, 3])
    await store.dropSnapshot()
    assert.equal(store.valid, false)
    assert.deepEqual(cow.readSync(0, CHUNK), buildHeader({ chunkBytes: CHUNK, valid: 0 }))
    const again = await load(cow)
    assert.equal(again.valid, false)
    assert.equal(again.store.valid, false)
    // Still invalid on the next activation too.
    assert.equal((await load(cow)).valid, false)
  })

  it('persistent-store: dropSnapshot is flushed', async () => {
    const recorder = new CrashRecorder()
    const cow = recorder.device('cow', new MemoryDevice(64 * CHUNK))
    const store = new PersistentStore(cow, { chunkBytes: CHUNK })
    await store.readMetadata(() => {})
    await store.dropSnapshot()
    const images = recorder.imagesAt(recorder.length, { unflushed: 'drop' })
    assert.equal((await load(images.get('cow') as MemoryDevice)).valid, false)
  })
})

async function commitAllOf(store: ExceptionStore, olds: number[]): Promise<boolean[]> {
  const prepared = olds.map((o) => store.prepareException(o))
  return Promise.all(prepared.map((e) => store.commitException(e, true)))
}

describe('persistent-store: merge support', () => {
  // Area 0 (full): old 100..109 -> new 2..11, then old 510..531 -> new 12..33.
  // Area 1 (5 entries): old 7,8,9 -> new 35,36,37; old 20,21 -> new 38,39.
  const area0: Pair[] = Array.from({ length: E }, (_, i) => [i < 10 ? 100 + i : 500 + i, 2 + i])
  const area1: Pair[] = [
    [7, 35],
    [8, 36],
    [9, 37],
    [20, 38],
    [21, 39],
  ]
  const cowBytes = 80 * CHUNK
  const image = () => MemoryDevice.fromBytes(buildCow({ chunkBytes: CHUNK, cowBytes, entries: [...area0, ...area1] }))

  it('persistent-store: prepareMerge returns the runs from the end backwards; commitMerge shortens the table (invariant 43)', async () => {
    const cow = image()
    const { store, table } = await load(cow)
    assert.deepEqual(table, [...area0, ...area1])
    const bothRuns = [
      { count: 2, lastOld: 21, lastNew: 39 },
      { count: 3, lastOld: 9, lastNew: 37 },
    ]
    assert.deepEqual(await store.prepareMerge(5), bothRuns)
    // prepareMerge is idempotent until the commit.
    assert.deepEqual(await store.prepareMerge(5), bothRuns)
    // maxEntries bounds the batch; the oldest run returned is cut short to fit.
    assert.deepEqual(await store.prepareMerge(2), [{ count: 2, lastOld: 21, lastNew: 39 }])
    assert.deepEqual(await store.prepareMerge(3), [
      { count: 2, lastOld: 21, lastNew: 39 },
      { count: 1, lastOld: 9, lastNew: 37 },
    ])
    await store.commitMerge(2)
    assert.deepEqual(cow.readSync(areaLocation(CHUNK, 1) * CHUNK, CHUNK), buildArea(CHUNK, area1.slice(0, 3)))
    assert.deepEqual((await load(cow)).table, [...area0, ...area1.slice(0, 3)])

    assert.deepEqual(await store.prepareMerge(3), [{ count: 3, lastOld: 9, lastNew: 37 }])
    await store.commitMerge(3)
    assert.deepEqual((await load(cow)).table, area0)
    // Area 1 still counts as metadata until the next prepareMerge (kernel behaviour).
    assert.deepEqual(store.usage(), { allocatedSectors: areaLocation(CHUNK, 1) + 1, totalSectors: 80, metadataSectors: 3 })

    // Crossing back into the previous (full) area.
    assert.deepEqual(await store.prepareMerge(22), [{ count: 22, lastOld: 531, lastNew: 33 }])
    assert.equal(store.usage().metadataSectors, 2)
    await store.commitMerge(22)
    assert.deepEqual((await load(cow)).table, area0.slice(0, 10))

    assert.deepEqual(await store.prepareMerge(), [{ count: 10, lastOld: 109, lastNew: 11 }])
    await store.commitMerge(10)
    assert.deepEqual(await store.prepareMerge(), [])
    const usage = store.usage()
    assert.equal(usage.allocatedSectors, usage.metadataSectors)
    assert.equal(usage.allocatedSectors, 2)
    assert.deepEqual((await load(cow)).table, [])
  })

  it('persistent-store: prepareMerge(max, endIndex) returns the batch before one still committing; prepare and commit take turns', async () => {
    const cow = image()
    const { store } = await load(cow)
    assert.equal(store.mergeEntries(), E + 5)
    const before = [{ count: 10, lastOld: 531, lastNew: 33 }]
    assert.deepEqual(await store.prepareMerge(5), [
      { count: 2, lastOld: 21, lastNew: 39 },
      { count: 3, lastOld: 9, lastNew: 37 },
    ])
    assert.deepEqual(await store.prepareMerge(10, E), before)
    // Asked for while the last 5 entries commit: the same batch, before or after the commit.
    const [, during] = await Promise.all([store.commitMerge(5), store.prepareMerge(10, E)])
    assert.deepEqual(during, before)
    assert.equal(store.mergeEntries(), E)
    assert.deepEqual(await store.prepareMerge(10, E), before)
    assert.deepEqual(await store.prepareMerge(10), before)
    assert.deepEqual(await store.prepareMerge(3, 0), [])
    await rejectsCode(store.prepareMerge(3, E + 1), 'SNAP_BAD_ARGUMENT')
    await rejectsCode(store.prepareMerge(3, 1.5), 'SNAP_BAD_ARGUMENT')
    await store.commitMerge(10)
    assert.deepEqual((await load(cow)).table, area0.slice(0, E - 10))
  })

  it('persistent-store: a partial commitMerge leaves the rest of the batch', async () => {
    const cow = image()
    const { store } = await load(cow)
    assert.deepEqual((await store.prepareMerge(5))[0], { count: 2, lastOld: 21, lastNew: 39 })
    await store.commitMerge(1)
    assert.deepEqual(await store.prepareMerge(1), [{ count: 1, lastOld: 20, lastNew: 38 }])
    await rejectsCode(store.commitMerge(E + 5), 'SNAP_BAD_ARGUMENT') // more than the table holds
    await rejectsCode(store.commitMerge(0), 'SNAP_BAD_ARGUMENT')
    await rejectsCode(store.prepareMerge(0), 'SNAP_BAD_ARGUMENT')
  })

  it('persistent-store: a batch reaches back over several areas; runs break where an area sits between data chunks', async () => {
    // Every entry consecutive across 2 full areas and 3 more: consecutive in the origin, but the
    // COW chunks jump over each metadata area, so the runs are the areas' pieces.
    const entries: Pair[] = Array.from({ length: 2 * E + 3 }, (_, i) => [1000 + nthDataChunk(CHUNK, i), nthDataChunk(CHUNK, i)])
    const cow = MemoryDevice.fromBytes(buildCow({ chunkBytes: CHUNK, cowBytes: 120 * CHUNK, entries }))
    const { store } = await load(cow)
    assert.deepEqual(
      (await store.prepareMerge()).map((r) => r.count),
      [3, E, E],
    )
    // A batch ending inside area 1: area 2 is zeroed, area 1 keeps E - 4 entries.
    assert.deepEqual(
      (await store.prepareMerge(7)).map((r) => r.count),
      [3, 4],
    )
    await store.commitMerge(7)
    assert.deepEqual((await load(cow)).table, entries.slice(0, 2 * E - 4))
    assert.deepEqual(cow.readSync(areaLocation(CHUNK, 2) * CHUNK, CHUNK), new Uint8Array(CHUNK))
    // A batch ending on an area boundary: area 1 is emptied, area 0 stays full and area 1 ends the table.
    await store.commitMerge(E - 4)
    assert.deepEqual((await load(cow)).table, entries.slice(0, E))
    assert.deepEqual(cow.readSync(areaLocation(CHUNK, 1) * CHUNK, CHUNK), new Uint8Array(CHUNK))
    assert.deepEqual(store.usage().metadataSectors, 3, 'the emptied area counts as metadata until the next prepareMerge, as in the kernel')
    assert.deepEqual(
      (await store.prepareMerge()).map((r) => r.count),
      [E],
    )
    await store.commitMerge(E)
    assert.deepEqual(await store.prepareMerge(), [])
    assert.deepEqual((await load(cow)).table, [])
    const usage = store.usage()
    assert.equal(usage.allocatedSectors, usage.metadataSectors)
  })

  it('persistent-store: one commitMerge over a batch of scattered runs leaves the COW byte-identical to merging run by run', async () => {
    const random = new Random(43)
    // 2 full areas and 11 more entries, scattered old chunks: nearly every run is 1 entry.
    const n = 2 * E + 11
    const entries: Pair[] = Array.from({ length: n }, (_, i) => [random.int(1 << 20), nthDataChunk(CHUNK, i)])
    const bytes = buildCow({ chunkBytes: CHUNK, cowBytes: 120 * CHUNK, entries })
    const batched = MemoryDevice.fromBytes(bytes)
    const single = MemoryDevice.fromBytes(bytes.slice())
    const a = (await load(batched)).store
    const b = (await load(single)).store
    let steps = 0
    let singleSteps = 0
    for (;;) {
      const runs = await a.prepareMerge(random.chance(0.5) ? Infinity : 1 + random.int(E))
      if (runs.length === 0) break
      steps++
      const k = runs.reduce((sum, r) => sum + r.count, 0)
      await a.commitMerge(k)
      // The same entries, one run per commit.
      for (let done = 0; done < k; ) {
        const [run] = await b.prepareMerge(k - done)
        assert.ok(run)
        await b.commitMerge(run.count)
        done += run.count
        singleSteps++
      }
      assert.deepEqual(batched.readSync(0, 120 * CHUNK), single.readSync(0, 120 * CHUNK), `COW images after step ${steps}`)
      assert.deepEqual(a.usage(), b.usage())
    }
    assert.deepEqual(await b.prepareMerge(), [])
    assert.ok(steps * 4 < singleSteps, `${steps} batched steps vs ${singleSteps} single-run steps`)
    assert.deepEqual((await load(batched)).table, [])
  })

  it('persistent-store: commitMerge writes with a preflush and FUA, once however many areas the batch empties', async () => {
    const recorder = new CrashRecorder()
    const cow = recorder.device('cow', image())
    const store = new PersistentStore(cow, { chunkBytes: CHUNK })
    await store.readMetadata(() => {})
    let start = recorder.length
    await store.commitMerge(3)
    assert.deepEqual(
      recorder.events().slice(start).map((e) => e.kind),
      ['flush', 'write', 'flush'],
    )
    // The rest of area 1 and most of area 0: area 1 is zeroed by a plain write, area 0 with FUA.
    start = recorder.length
    await store.commitMerge(2 + E - 4)
    const events = recorder.events().slice(start)
    assert.deepEqual(
      events.map((e) => [e.kind, e.offset]),
      [
        ['flush', undefined],
        ['write', areaLocation(CHUNK, 1) * CHUNK],
        ['write', areaLocation(CHUNK, 0) * CHUNK],
        ['flush', undefined],
      ],
    )
    assert.deepEqual((await load(cow.base)).table, area0.slice(0, 4))
  })

  it('persistent-store: merging an empty table returns no runs at once', async () => {
    const { store } = await load(new MemoryDevice(16 * CHUNK))
    assert.deepEqual(await store.prepareMerge(), [])
  })
})

describe('persistent-store: crash consistency', () => {
  async function record(seed: number) {
    const recorder = new CrashRecorder()
    const cowBytes = 140 * CHUNK
    const cow = recorder.device('cow', new MemoryDevice(cowBytes))
    const store = new PersistentStore(cow, { chunkBytes: CHUNK })
    await store.readMetadata(() => {})
    const random = new Random(seed)
    const allocation: Pair[] = []
    // For each allocation index: the log length when its commit resolved true.
    const resolvedAt: Array<number | undefined> = []
    const pending: PreparedException[] = []
    const inFlight: Array<Promise<unknown>> = []
    const commitOne = () => {
      const e = pending.splice(random.int(pending.length), 1)[0] as PreparedException
      inFlight.push(
        store.commitException(e, true).then((ok) => {
          assert.equal(ok, true)
          resolvedAt[e.sequence] = recorder.length
        }),
      )
    }
    while (allocation.length < 3 * E + 10) {
      const step = random.int(10)
      if (step < 3 || (step < 4 && pending.length === 0)) {
        const e = store.prepareException(random.int(100_000))
        allocation.push([e.oldChunk, e.newChunk])
        pending.push(e)
      } else if (step < 8 && pending.length > 0) {
        commitOne()
      } else if (step < 8 || pending.length > 0) {
        await new Promise((resolve) => setImmediate(resolve))
      } else {
        // Nothing outstanding: let the writer catch up so the next batch starts on a settled area.
        await Promise.all(inFlight)
      }
    }
    while (pending.length > 0) commitOne()
    await Promise.all(inFlight)
    return { recorder, allocation, resolvedAt, cowBytes }
  }

  for (const seed of [1, 2, 3]) {
    it(`persistent-store: every crash cut reloads to a durable prefix of the allocation order (seed ${seed})`, async () => {
      const { recorder, allocation, resolvedAt } = await record(seed)
      let cuts = 0
      for (let cut = 0; cut <= recorder.length; cut++) {
        const modes = [
          { unflushed: 'drop' as const },
          { unflushed: 'random' as const, tear: true, seed: seed * 100_000 + cut },
          { unflushed: 'keep' as const },
        ]
        for (const options of modes) {
          const image = recorder.imagesAt(cut, options).get('cow') as MemoryDevice
          const where = `seed ${seed} cut ${cut} ${JSON.stringify(options)}`
          const { table, valid } = await load(image).catch((err: unknown) => {
            throw new Error(`${where}: load failed: ${(err as { code?: string }).code}`, { cause: err })
          })
          assert.equal(valid, true, where)
          assert.deepEqual(table, allocation.slice(0, table.length), `${where}: table is a prefix of the allocation order`)
          const mustHave = resolvedAt.filter((at) => at !== undefined && at <= cut).length
          // resolvedAt is in allocation order, so the acknowledged ones form a prefix as well.
          assert.ok(table.length >= mustHave, `${where}: ${table.length} entries, ${mustHave} acknowledged`)
          cuts++
        }
      }
      const areaWrites = recorder.events().filter((e) => isAreaWrite(e, CHUNK) && nonZero(e.data)).length
      assert.ok(areaWrites >= 10, `only ${areaWrites} area writes: the schedule did not batch finely enough`)
      assert.ok(cuts > 100, `checked ${cuts} images`)
    })
  }
})

describe('persistent-store: grow-on-demand COW', () => {
  it('persistent-store: a growable COW of a few bytes is a truncated COW, refused, never re-initialised', async () => {
    const cow = MemoryDevice.fromBytes(new Uint8Array(100).fill(7))
    const store = new PersistentStore(cow, { chunkBytes: 4096, growable: true })
    await assert.rejects(store.readMetadata(() => {}), (err: unknown) => isSnapError(err, 'SNAP_CORRUPT_METADATA'))
    assert.equal(cow.sizeBytes, 100)
    assert.deepEqual(cow.readSync(0, 100), new Uint8Array(100).fill(7))
  })

  for (const initial of [0]) {
    it(`persistent-store: growable store over a ${initial}-byte device never runs out and grows`, async () => {
      const chunkBytes = 4096
      const cow = new MemoryDevice(initial)
      const store = new PersistentStore(cow, { chunkBytes, growable: true })
      assert.deepEqual(await store.readMetadata(() => {}), { valid: true })
      assert.ok(cow.sizeBytes >= 2 * chunkBytes)
      const expected: Pair[] = []
      const random = new Random(initial + 5)
      const count = 2 * (chunkBytes / 16) + 40 // crosses two areas
      let done = 0
      while (done < count) {
        const batch = Array.from({ length: Math.min(count - done, 1 + random.int(20)) }, () => store.prepareException(random.int(1e6)))
        const results = await Promise.all(
          batch.map(async (e) => {
            await store.whenSpaceReady(e)
            assert.ok(cow.sizeBytes >= (e.newChunk + 1) * chunkBytes, `chunk ${e.newChunk} fits after whenSpaceReady`)
            await cow.write(new Uint8Array(chunkBytes).fill(e.newChunk & 0xff), e.newChunk * chunkBytes)
            return store.commitException(e, true)
          }),
        )
        assert.ok(results.every((ok) => ok))
        expected.push(...batch.map((e): Pair => [e.oldChunk, e.newChunk]))
        done += batch.length
      }
      expected.forEach(([, n], i) => assert.equal(n, nthDataChunk(chunkBytes, i)))
      assert.equal(store.usage().totalSectors, cow.sizeBytes / 512)
      const again = new PersistentStore(cow, { chunkBytes, growable: true })
      const table: Pair[] = []
      await again.readMetadata((o, n) => table.push([o, n]))
      assert.deepEqual(table, expected)
      assert.deepEqual(again.usage(), store.usage())
    })
  }

  it('transient-store: growable store over an empty device never runs out and grows', async () => {
    const chunkBytes = 4096
    const cow = new MemoryDevice(0)
    const store: ExceptionStore = new TransientStore(cow, { chunkBytes, growable: true })
    await store.readMetadata(() => {})
    for (let i = 0; i < 300; i++) {
      const e = store.prepareException(i)
      assert.equal(e.newChunk, i)
      await store.whenSpaceReady(e)
      assert.ok(cow.sizeBytes >= (i + 1) * chunkBytes)
      assert.equal(await store.commitException(e, true), true)
    }
  })

  it('transient-store: a zero chunk size is refused', () => {
    assert.throws(
      () => new TransientStore(new MemoryDevice(4096), { chunkBytes: 0 }),
      (err: unknown) => (err as { code?: unknown }).code === 'SNAP_BAD_CHUNK_SIZE',
    )
  })
})
