/**
 * The ExceptionStore contract as a reusable suite (reference §2.5–§2.11, §4, invariants 26–27):
 * every store runs the same allocation, ordering, capacity, failure and usage checks. Store-
 * specific numbers (first chunk, metadata chunks, sectors per exception) come from `traits`.
 */
import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import type { BlockDevice } from '../../src/device/block-device.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import type { SnapErrorCode } from '../../src/errors.js'
import type { ExceptionStore, PreparedException } from '../../src/store/exception-store.js'

export interface ExceptionStoreTraits {
  /** Persistent layout (header, areas, data from chunk 2) versus transient (data from chunk 0). */
  readonly persistent: boolean
}

export type ExceptionStoreFactory = (cow: BlockDevice, chunkBytes: number) => ExceptionStore

const CHUNK = 512 // E = 32, so area boundaries are cheap to reach
const SECTORS = CHUNK / 512
const E = CHUNK / 16

function throwsCode(fn: () => unknown, code: SnapErrorCode): void {
  assert.throws(fn, (err: unknown) => {
    assert.equal((err as { code?: unknown }).code, code)
    return true
  })
}

async function rejectsCode(promise: Promise<unknown>, code: SnapErrorCode): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.equal((err as { code?: unknown }).code, code)
    return true
  })
}

/** The i-th chunk a fresh store hands out. */
export function expectedChunk(persistent: boolean, chunkBytes: number, i: number): number {
  if (!persistent) return i
  const e = chunkBytes / 16
  return 2 + Math.floor(i / e) * (e + 1) + (i % e)
}

export function runExceptionStoreSuite(name: string, factory: ExceptionStoreFactory, traits: ExceptionStoreTraits): void {
  const { persistent } = traits

  const open = async (cowBytes: number, chunkBytes = CHUNK): Promise<{ store: ExceptionStore; cow: MemoryDevice; seen: Array<[number, number]> }> => {
    const cow = new MemoryDevice(cowBytes)
    const store = factory(cow, chunkBytes)
    const seen: Array<[number, number]> = []
    const result = await store.readMetadata((o, n) => seen.push([o, n]))
    assert.deepEqual(result, { valid: true })
    return { store, cow, seen }
  }

  const commitAll = (store: ExceptionStore, list: PreparedException[]) => Promise.all(list.map((e) => store.commitException(e, true)))

  describe(`${name}: ExceptionStore conformance`, () => {
    it(`${name}: fresh readMetadata is valid with no exceptions`, async () => {
      const { store, seen } = await open(64 * CHUNK)
      assert.deepEqual(seen, [])
      assert.equal(store.valid, true)
      assert.equal(store.chunkBytes, CHUNK)
      assert.equal(store.kind, persistent ? 'persistent' : 'transient')
      assert.equal(store.supportsMerge, persistent)
    })

    it(`${name}: prepare allocates distinct chunks in allocation order`, async () => {
      const { store } = await open(200 * CHUNK)
      const count = 3 * E + 5 // crosses several metadata areas
      const prepared = Array.from({ length: count }, (_, i) => store.prepareException(1000 + i))
      prepared.forEach((e, i) => {
        assert.equal(e.oldChunk, 1000 + i)
        assert.equal(e.newChunk, expectedChunk(persistent, CHUNK, i), `allocation ${i}`)
        assert.equal(e.sequence, i)
      })
      assert.equal(new Set(prepared.map((e) => e.newChunk)).size, count)
      if (persistent) {
        for (const e of prepared) assert.notEqual(e.newChunk % (E + 1), 1, `chunk ${e.newChunk} is a metadata area`)
        assert.equal(prepared[E - 1]?.newChunk, E + 1)
        assert.equal(prepared[E]?.newChunk, E + 3) // E + 2 is area 1
      } else {
        assert.equal(prepared[0]?.newChunk, 0)
      }
      assert.deepEqual(new Set(await commitAll(store, prepared)), new Set([true]))
    })

    it(`${name}: out-of-order commits settle in allocation order`, async () => {
      const { store } = await open(64 * CHUNK)
      const prepared = [0, 1, 2].map((i) => store.prepareException(50 + i))
      const order: number[] = []
      const promises = [2, 1, 0].map((i) =>
        store.commitException(prepared[i] as PreparedException, true).then((ok) => {
          order.push(i)
          return ok
        }),
      )
      assert.deepEqual(await Promise.all(promises), [true, true, true])
      assert.deepEqual(order, [0, 1, 2])
    })

    it(`${name}: random commit order over many exceptions still settles in allocation order`, async () => {
      const { store } = await open(200 * CHUNK)
      const prepared = Array.from({ length: 2 * E + 7 }, (_, i) => store.prepareException(i))
      const shuffled = prepared.slice()
      let seed = 12345
      for (let i = shuffled.length - 1; i > 0; i--) {
        seed = (seed * 1103515245 + 12345) % 2147483648
        const j = seed % (i + 1)
        ;[shuffled[i], shuffled[j]] = [shuffled[j] as PreparedException, shuffled[i] as PreparedException]
      }
      const order: number[] = []
      const results = await Promise.all(
        shuffled.map((e) =>
          store.commitException(e, true).then((ok) => {
            order.push(e.sequence)
            return ok
          }),
        ),
      )
      assert.ok(results.every((ok) => ok))
      assert.deepEqual(
        order,
        prepared.map((e) => e.sequence),
      )
    })

    it(`${name}: SNAP_NO_SPACE exactly when the next data chunk does not fit`, async () => {
      const chunks = 7
      const { store } = await open(chunks * CHUNK)
      const fits = persistent ? chunks - 2 : chunks
      const prepared: PreparedException[] = []
      for (let i = 0; i < fits; i++) prepared.push(store.prepareException(i))
      assert.equal(prepared.at(-1)?.newChunk, chunks - 1)
      throwsCode(() => store.prepareException(99), 'SNAP_NO_SPACE')
      // A refused allocation consumes nothing and does not poison the store.
      throwsCode(() => store.prepareException(99), 'SNAP_NO_SPACE')
      assert.deepEqual(await commitAll(store, prepared), prepared.map(() => true))
      assert.equal(store.valid, true)
    })

    it(`${name}: a partial last chunk is never handed out`, async () => {
      const { store } = await open((persistent ? 3 : 1) * CHUNK + CHUNK / 2)
      const e = store.prepareException(0)
      assert.equal(e.newChunk, persistent ? 2 : 0)
      throwsCode(() => store.prepareException(1), 'SNAP_NO_SPACE')
      assert.equal(await store.commitException(e, true), true)
    })

    it(`${name}: a failed commit invalidates the store; its batch and later commits resolve false`, async () => {
      const { store } = await open(64 * CHUNK)
      const good = await store.commitException(store.prepareException(1), true)
      assert.equal(good, true)
      const a = store.prepareException(2)
      const b = store.prepareException(3)
      const results = await Promise.all([store.commitException(b, true), store.commitException(a, false)])
      assert.deepEqual(results, [false, false])
      assert.equal(store.valid, false)
      const later = await store.commitException(store.prepareException(4), true)
      assert.equal(later, false)
      assert.equal(store.valid, false)
    })

    it(`${name}: usage numbers for a fresh store and per exception (invariants 26, 27)`, async () => {
      const cowChunks = 200
      const { store } = await open(cowChunks * CHUNK)
      const total = cowChunks * SECTORS
      const fresh = persistent ? 2 * SECTORS : 0
      assert.deepEqual(store.usage(), { allocatedSectors: fresh, totalSectors: total, metadataSectors: fresh })
      for (let n = 1; n <= 2 * E + 3; n++) {
        assert.equal(await store.commitException(store.prepareException(n), true), true)
        const areasFilled = Math.floor(n / E)
        const expected = persistent
          ? { allocatedSectors: (2 + n + areasFilled) * SECTORS, totalSectors: total, metadataSectors: (2 + areasFilled) * SECTORS }
          : { allocatedSectors: n * SECTORS, totalSectors: total, metadataSectors: 0 }
        assert.deepEqual(store.usage(), expected, `after ${n} exceptions`)
      }
    })

    it(`${name}: usage reports allocation at prepare time`, async () => {
      const { store } = await open(64 * CHUNK)
      const before = store.usage().allocatedSectors
      const e = store.prepareException(5)
      assert.equal(store.usage().allocatedSectors, before + SECTORS)
      await store.commitException(e, true)
      assert.equal(store.usage().allocatedSectors, before + SECTORS)
    })

    it(`${name}: usage with a larger chunk size counts sectors of that chunk`, async () => {
      const chunkBytes = 4096
      const { store } = await open(64 * chunkBytes, chunkBytes)
      const c = chunkBytes / 512
      assert.deepEqual(store.usage(), {
        allocatedSectors: persistent ? 2 * c : 0,
        totalSectors: 64 * c,
        metadataSectors: persistent ? 2 * c : 0,
      })
      await store.commitException(store.prepareException(0), true)
      assert.equal(store.usage().allocatedSectors, (persistent ? 3 : 1) * c)
    })

    if (!persistent) {
      it(`${name}: prepareMerge and commitMerge reject with SNAP_MERGE_REFUSED`, async () => {
        const { store } = await open(64 * CHUNK)
        await store.commitException(store.prepareException(0), true)
        await rejectsCode(store.prepareMerge(), 'SNAP_MERGE_REFUSED')
        await rejectsCode(store.commitMerge(1), 'SNAP_MERGE_REFUSED')
      })

      it(`${name}: a reload starts empty`, async () => {
        const { store, cow } = await open(64 * CHUNK)
        await store.commitException(store.prepareException(0), true)
        const again = factory(cow, CHUNK)
        const seen: Array<[number, number]> = []
        assert.deepEqual(await again.readMetadata((o, n) => seen.push([o, n])), { valid: true })
        assert.deepEqual(seen, [])
        assert.equal(again.prepareException(9).newChunk, 0)
      })
    }

    it(`${name}: dropSnapshot makes the store invalid and commits resolve false`, async () => {
      const { store } = await open(64 * CHUNK)
      const e = store.prepareException(0)
      await store.dropSnapshot()
      assert.equal(store.valid, false)
      assert.equal(await store.commitException(e, true), false)
    })

    it(`${name}: whenSpaceReady resolves for a fixed-size COW`, async () => {
      const { store } = await open(64 * CHUNK)
      const e = store.prepareException(0)
      await store.whenSpaceReady(e)
      assert.equal(await store.commitException(e, true), true)
    })
  })
}
