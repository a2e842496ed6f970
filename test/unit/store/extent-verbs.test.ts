/**
 * The stores' extent verbs: prepareExceptions hands out runs of consecutive COW chunks that stop
 * at metadata areas and at a full COW, one commit per extent records one 16-byte entry per chunk,
 * and the COW comes out byte-identical to preparing and committing the same chunks one by one.
 */
import assert from 'node:assert/strict'
import { describe, it } from 'node:test'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import { isSnapError } from '../../../src/errors.js'
import type { ExceptionStore, PreparedException } from '../../../src/store/exception-store.js'
import { PersistentStore } from '../../../src/store/persistent-store.js'
import { TransientStore } from '../../../src/store/transient-store.js'
import { Random } from '../../support/random.js'

const CHUNK = 512 // 32 entries per area, areas every 33 chunks

/** Commits `list` in a random order (the store records in allocation order anyway). */
async function commitShuffled(store: ExceptionStore, list: PreparedException[], random: Random): Promise<boolean[]> {
  const order = list.map((_, i) => i)
  for (let i = order.length - 1; i > 0; i--) {
    const j = random.int(i + 1)
    ;[order[i], order[j]] = [order[j] as number, order[i] as number]
  }
  const results: boolean[] = new Array(list.length)
  await Promise.all(order.map(async (i) => (results[i] = await store.commitException(list[i] as PreparedException, true))))
  return results
}

describe('store extent verbs', () => {
  for (const seed of [1, 2, 3, 4, 5]) {
    it(`persistent: extents leave the COW byte-identical to one chunk at a time (seed ${seed})`, async () => {
      const random = new Random(seed)
      const byExtent = new MemoryDevice(CHUNK * 400)
      const byChunk = new MemoryDevice(CHUNK * 400)
      const a = new PersistentStore(byExtent, { chunkBytes: CHUNK })
      const b = new PersistentStore(byChunk, { chunkBytes: CHUNK })
      await a.readMetadata(() => {})
      await b.readMetadata(() => {})
      let old = 0
      for (let batch = 0; batch < 12; batch++) {
        const extents: PreparedException[] = []
        const singles: PreparedException[] = []
        for (let n = 1 + random.int(4); n > 0; n--) {
          const want = 1 + random.int(random.chance(0.3) ? 70 : 8)
          let e: PreparedException
          try {
            e = a.prepareExceptions(old, want)
          } catch (err) {
            assert.ok(isSnapError(err, 'SNAP_NO_SPACE'))
            assert.throws(() => b.prepareException(old), (x: unknown) => isSnapError(x, 'SNAP_NO_SPACE'))
            break
          }
          assert.ok(e.count >= 1 && e.count <= want, `count ${e.count} within 1..${want}`)
          // consecutive COW chunks, none of them a metadata area (chunk % 33 === 1)
          for (let k = 0; k < e.count; k++) assert.notEqual((e.newChunk + k) % 33, 1, 'an extent never covers a metadata area')
          extents.push(e)
          for (let k = 0; k < e.count; k++) {
            const s = b.prepareException(old + k)
            assert.equal(s.newChunk, e.newChunk + k, 'the same COW chunks as one at a time')
            singles.push(s)
          }
          old += e.count + random.int(3)
        }
        assert.ok((await commitShuffled(a, extents, random)).every(Boolean))
        assert.ok((await commitShuffled(b, singles, random)).every(Boolean))
        assert.deepEqual(byExtent.readSync(0, byExtent.sizeBytes), byChunk.readSync(0, byChunk.sizeBytes), `batch ${batch}: same bytes`)
        assert.deepEqual(a.usage(), b.usage())
      }
      assert.ok(old > 100, 'the trace crossed several metadata areas')
    })
  }

  it('persistent: an extent is cut short by a full COW and the next prepare fails', async () => {
    const cow = new MemoryDevice(CHUNK * 6) // header, area 0, data chunks 2..5
    const store = new PersistentStore(cow, { chunkBytes: CHUNK })
    await store.readMetadata(() => {})
    const e = store.prepareExceptions(0, 10)
    assert.deepEqual({ newChunk: e.newChunk, count: e.count }, { newChunk: 2, count: 4 })
    assert.throws(() => store.prepareExceptions(4, 1), (x: unknown) => isSnapError(x, 'SNAP_NO_SPACE'))
    assert.equal(await store.commitException(e, true), true)
    const table: Array<[number, number]> = []
    await new PersistentStore(cow, { chunkBytes: CHUNK }).readMetadata((o, n) => table.push([o, n]))
    assert.deepEqual(table, [
      [0, 2],
      [1, 3],
      [2, 4],
      [3, 5],
    ])
  })

  it('persistent: an abandoned extent records nothing and its chunks are handed out again', async () => {
    const store = new PersistentStore(new MemoryDevice(CHUNK * 100), { chunkBytes: CHUNK })
    await store.readMetadata(() => {})
    const e = store.prepareExceptions(7, 5)
    await store.abandonException(e)
    const again = store.prepareExceptions(7, 5)
    assert.equal(again.newChunk, e.newChunk)
    assert.equal(await store.commitException(again, true), true)
  })

  it('transient: extents stop at a full COW and use chunks from 0', async () => {
    const store = new TransientStore(new MemoryDevice(CHUNK * 10), { chunkBytes: CHUNK })
    const a = store.prepareExceptions(100, 4)
    const b = store.prepareExceptions(200, 10)
    assert.deepEqual([a.newChunk, a.count, b.newChunk, b.count], [0, 4, 4, 6])
    assert.throws(() => store.prepareExceptions(300, 1), (x: unknown) => isSnapError(x, 'SNAP_NO_SPACE'))
    assert.deepEqual(await Promise.all([store.commitException(b, true), store.commitException(a, true)]), [true, true])
    assert.equal(store.usage().allocatedSectors, 10)
  })
})
