/**
 * The bulk open path (ExceptionTable.bulkLoad, radix sort, PersistentStore.readMetadataInto,
 * Snapshot.load) against the one-by-one path it replaces, used as the model: the same chunks,
 * the same runs (run structure depends on insertion order), the same capacity, the same errors.
 */
import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import { ExceptionTable, type ExceptionRun } from '../../../src/snapshot/exception-table.js'
import { Origin } from '../../../src/snapshot/origin.js'
import { Snapshot } from '../../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../../src/store/persistent-store.js'
import { radixSortWithIndex } from '../../../src/util/radix-sort.js'
import { buildCow, nthDataChunk } from '../../support/byte-builder.js'
import { Random } from '../../support/random.js'

type Pair = [number, number]
const TWO32 = 2 ** 32

function sortedRuns(t: ExceptionTable): ExceptionRun[] {
  return [...t.runs()].sort((a, b) => a.old - b.old)
}

function oneByOne(entries: readonly Pair[]): ExceptionTable {
  const t = new ExceptionTable()
  for (const [o, n] of entries) t.insert(o, n)
  return t
}

function bulk(entries: readonly Pair[]): ExceptionTable {
  const t = new ExceptionTable()
  const olds = Uint32Array.from(entries, (e) => e[0])
  const news = Uint32Array.from(entries, (e) => e[1])
  assert.equal(t.bulkLoad(olds, news, entries.length), true, 'bulkLoad accepted')
  return t
}

function assertSameTable(got: ExceptionTable, want: ExceptionTable, probes: Iterable<number>, what: string): void {
  assert.equal(got.size, want.size, `${what}: size`)
  assert.equal(got.runCount, want.runCount, `${what}: runCount`)
  assert.equal(got.memoryBytes(), want.memoryBytes(), `${what}: memoryBytes`)
  assert.deepEqual(sortedRuns(got), sortedRuns(want), `${what}: runs`)
  for (const o of probes) {
    for (const p of [o - 1, o, o + 1]) {
      if (got.lookup(p) !== want.lookup(p)) assert.fail(`${what}: lookup(${p}) ${got.lookup(p)} != ${want.lookup(p)}`)
      assert.deepEqual(got.lookupRun(p), want.lookupRun(p), `${what}: lookupRun(${p})`)
    }
  }
}

function shuffle<T>(r: Random, a: T[]): T[] {
  for (let i = a.length - 1; i > 0; i--) {
    const j = r.int(i + 1)
    ;[a[i], a[j]] = [a[j] as T, a[i] as T]
  }
  return a
}

/**
 * Chains of consecutive origin chunks on consecutive COW chunks (up to 300 long, so they cross
 * group boundaries; some start just below one), in an order chosen by `order`.
 */
function chains(r: Random, count: number, span: number, base: number, order: 'table' | 'shuffled' | 'local'): Pair[] {
  const taken = new Set<number>()
  const groups: Pair[][] = []
  let cow = 2
  for (let c = 0; c < count; c++) {
    const len = 1 + (r.int(4) === 0 ? r.int(300) : r.int(6))
    let start = base + r.int(span)
    if (r.int(3) === 0) start = base + Math.max(0, Math.floor(r.int(span) / 256) * 256 - r.int(4))
    const chain: Pair[] = []
    for (let k = 0; k < len && start + k < TWO32; k++) {
      if (taken.has(start + k)) break
      taken.add(start + k)
      chain.push([start + k, cow++])
    }
    // a gap in the COW between chains, so chains do not link to each other by accident
    cow += r.int(3)
    groups.push(chain)
  }
  if (order === 'table') return groups.flat()
  if (order === 'shuffled') return shuffle(r, groups.flat())
  // chains in random order, each chain's own entries in a random order
  return shuffle(r, groups).flatMap((g) => shuffle(r, g))
}

describe('exception-table: bulkLoad against one-by-one insert', () => {
  const cases: Array<{ name: string; make: (r: Random) => Pair[] }> = [
    { name: 'chains in table order (COW chunks ascending)', make: (r) => chains(r, 400, 20000, 0, 'table') },
    { name: 'chains shuffled', make: (r) => chains(r, 400, 20000, 0, 'shuffled') },
    { name: 'chains with each chain in random order', make: (r) => chains(r, 400, 20000, 0, 'local') },
    { name: 'crowded groups', make: (r) => chains(r, 1500, 3000, 0, 'local') },
    { name: 'near 2^32', make: (r) => chains(r, 200, 5000, TWO32 - 5000, 'local') },
    {
      name: 'dense random, COW ascending',
      make: (r) => shuffle(r, Array.from({ length: 6000 }, (_, i) => i)).slice(0, 2500).map((o, i): Pair => [o, 2 + i]),
    },
    {
      name: 'COW chunks near 2^32',
      make: (r) => chains(r, 300, 8000, 1000, 'shuffled').map(([o, n]): Pair => [o, TWO32 - 10000 + n]),
    },
  ]
  for (const c of cases) {
    for (const seed of [1, 2, 3, 4, 5]) {
      it(`exception-table: bulkLoad equals one-by-one, ${c.name} (seed ${seed})`, () => {
        const r = new Random(seed)
        const entries = c.make(r)
        const want = oneByOne(entries)
        const got = bulk(entries)
        const probes = entries.map((e) => e[0])
        assertSameTable(got, want, probes, `seed ${seed}`)
        // Both tables stay usable the same way: inserts and merge-style removals afterwards.
        for (let k = 0; k < 50; k++) {
          const o = entries[0]![0] + r.int(30000)
          if (want.has(o)) continue
          const n = 1 + r.int(1e6)
          want.insert(o, n)
          got.insert(o, n)
          probes.push(o)
        }
        for (const run of sortedRuns(want).slice(0, 100)) {
          want.remove(run.old + run.count)
          got.remove(run.old + run.count)
        }
        assertSameTable(got, want, probes, `seed ${seed} after insert/remove`)
      })
    }
  }

  /**
   * Origin chunks already ascending (what sequential changes leave) skip the sort: the table
   * must come out as the sort would have made it, whether the COW chunks ascend too (they stand
   * in for the positions) or not (the positions are made up instead), and an entry out of order
   * anywhere, even the last, must still send the load through the sort.
   */
  function ascending(r: Random, count: number, cowOrder: 'ascending' | 'shuffled', outOfOrderAt: number | null): Pair[] {
    const olds: number[] = []
    for (let o = r.int(1000); olds.length < count; o += 1 + (r.int(3) === 0 ? r.int(600) : 0)) olds.push(o)
    const news = olds.map((_, i) => 2 + i + Math.floor(i / 7))
    if (cowOrder === 'shuffled') shuffle(r, news)
    const entries = olds.map((o, i): Pair => [o, news[i]!])
    if (outOfOrderAt !== null) {
      const i = outOfOrderAt < 0 ? entries.length + outOfOrderAt : outOfOrderAt
      ;[entries[i - 1], entries[i]] = [entries[i]!, entries[i - 1]!]
    }
    return entries
  }

  for (const seed of [21, 22, 23, 24]) {
    for (const cowOrder of ['ascending', 'shuffled'] as const) {
      for (const outOfOrderAt of [null, 1, -1, 1500]) {
        const where = outOfOrderAt === null ? 'all in order' : outOfOrderAt === -1 ? 'the last pair swapped' : `pair ${outOfOrderAt} swapped`
        it(`exception-table: bulkLoad of ascending origin chunks, COW ${cowOrder}, ${where}, equals one-by-one and a Map (seed ${seed})`, () => {
          const r = new Random(seed)
          const entries = ascending(r, 3000, cowOrder, outOfOrderAt)
          const model = new Map(entries)
          const want = oneByOne(entries)
          const got = bulk(entries)
          const probes = entries.map((e) => e[0])
          assertSameTable(got, want, probes, `seed ${seed}`)
          assert.equal(got.size, model.size)
          const last = entries.reduce((m, e) => Math.max(m, e[0]), 0)
          for (let o = 0; o <= last + 2; o++) {
            const n = model.get(o) ?? -1
            if (got.lookup(o) !== n) assert.fail(`seed ${seed}: lookup(${o}) ${got.lookup(o)}, the Map says ${n}`)
          }
        })
      }
    }
  }

  it('exception-table: bulkLoad of ascending origin chunks with a repeated one declines, leaving the table empty', () => {
    const t = new ExceptionTable()
    assert.equal(t.bulkLoad(Uint32Array.of(1, 2, 2, 3), Uint32Array.of(2, 3, 4, 5), 4), false)
    assert.equal(t.size, 0)
    assert.equal(t.lookup(2), -1)
  })

  it('exception-table: bulkLoad of nothing leaves an empty table', () => {
    const t = new ExceptionTable()
    assert.equal(t.bulkLoad(new Uint32Array(0), new Uint32Array(0), 0), true)
    assertSameTable(t, new ExceptionTable(), [0, 5], 'empty')
  })

  it('exception-table: bulkLoad declines duplicates and non-empty tables, leaving the table as it was', () => {
    const t = new ExceptionTable()
    assert.equal(t.bulkLoad(Uint32Array.of(5, 700, 5), Uint32Array.of(2, 3, 4), 3), false)
    assert.equal(t.size, 0)
    assert.equal(t.runCount, 0)
    assert.equal(t.lookup(5), -1)
    t.insert(9, 2)
    assert.equal(t.bulkLoad(Uint32Array.of(10), Uint32Array.of(3), 1), false)
    assert.equal(t.size, 1)
    assert.equal(t.lookup(10), -1)
  })

  it('exception-table: a gap filled later extends the lower run, in bulk too', () => {
    // 5 -> 10 and 7 -> 12 first, then 6 -> 11: one-by-one keeps two runs [5,6] and [7]
    const entries: Pair[] = [
      [5, 10],
      [7, 12],
      [6, 11],
      [300, 50],
      [299, 49],
      [298, 48],
    ]
    const want = oneByOne(entries)
    assert.equal(want.runCount, 3)
    assertSameTable(bulk(entries), want, [5, 6, 7, 298, 299, 300], 'gap')
  })
})

describe('radix-sort', () => {
  for (const [name, maxKey] of [
    ['small keys', 50],
    ['25-bit keys', 2 ** 25],
    ['full 32-bit keys', TWO32],
  ] as const) {
    for (const withPayload of [false, true]) {
      it(`radix-sort: ${name}${withPayload ? ' with a payload' : ''} sorts stably`, () => {
        const r = new Random(maxKey)
        const n = 5000
        const keys = Uint32Array.from({ length: n }, () => (r.int(8) === 0 ? maxKey - 1 : r.int(maxKey)))
        const payload = withPayload ? Uint32Array.from({ length: n }, () => r.int(TWO32)) : null
        const before = Array.from(keys)
        const payloadBefore = payload ? Array.from(payload) : null
        const want = before.map((k, i) => [k, i] as const).sort((a, b) => a[0] - b[0] || a[1] - b[1])
        const got = radixSortWithIndex(keys, n, payload)
        assert.deepEqual(Array.from(got.keys), want.map((w) => w[0]))
        assert.deepEqual(Array.from(got.index), want.map((w) => (payloadBefore ? (payloadBefore[w[1]] as number) : w[1])))
        if (payload) assert.deepEqual(Array.from(payload), payloadBefore, 'payload left intact')
      })
    }
  }
})

describe('snapshot: opening a persistent COW in bulk', () => {
  const CHUNK = 512 // 32 entries per area: many areas, so the read-ahead is exercised

  function cowOf(entries: ReadonlyArray<readonly [number | bigint, number | bigint]>, extraChunks = 0): MemoryDevice {
    const last = nthDataChunk(CHUNK, Math.max(0, entries.length - 1))
    const cowBytes = (last + 2 + extraChunks) * CHUNK
    return MemoryDevice.fromBytes(buildCow({ chunkBytes: CHUNK, cowBytes, entries }))
  }

  async function open(cow: MemoryDevice, bulkPath: boolean): Promise<{ snap: Snapshot; error: unknown }> {
    const origin = new Origin(new MemoryDevice(1 << 20))
    const store = new PersistentStore(cow.clone(), { chunkBytes: CHUNK })
    // without readMetadataInto the snapshot takes the visitor path, the model
    if (!bulkPath) (store as { readMetadataInto?: unknown }).readMetadataInto = undefined
    const snap = new Snapshot({ name: bulkPath ? 'bulk' : 'model', store })
    let error: unknown = null
    try {
      await origin.addSnapshot(snap)
    } catch (err) {
      error = err
    }
    return { snap, error }
  }

  async function assertSameOpen(cow: MemoryDevice, what: string): Promise<{ error: unknown; snap: Snapshot }> {
    const model = await open(cow, false)
    const got = await open(cow, true)
    if (model.error !== null || got.error !== null) {
      assert.ok(got.error instanceof Error && model.error instanceof Error, `${what}: both fail (${String(got.error)} / ${String(model.error)})`)
      assert.equal((got.error as { code?: unknown }).code, (model.error as { code?: unknown }).code, `${what}: error code`)
      assert.equal(got.error.message, model.error.message, `${what}: error message`)
      return got
    }
    const probes = [...model.snap.table.runs()].flatMap((r) => [r.old, r.old + r.count])
    assertSameTable(got.snap.table, model.snap.table, probes, what)
    assert.deepEqual(got.snap.usage(), model.snap.usage(), `${what}: usage (next free chunk)`)
    return got
  }

  for (const seed of [11, 12, 13]) {
    it(`snapshot: bulk open equals the visitor path on random tables (seed ${seed})`, async () => {
      const r = new Random(seed)
      const olds = chains(r, 300, 4000, 0, 'local').map((e) => e[0])
      const entries = olds.map((o, i): Pair => [o, nthDataChunk(CHUNK, i)])
      // a partly used last area too
      for (const n of [entries.length, entries.length - 7, 32 * 3]) await assertSameOpen(cowOf(entries.slice(0, n)), `seed ${seed}, ${n} entries`)
    })
  }

  it('snapshot: bulk open of an empty table and of exactly full areas', async () => {
    await assertSameOpen(cowOf([]), 'empty')
    const full = Array.from({ length: 64 }, (_, i): Pair => [1000 - i, nthDataChunk(CHUNK, i)])
    await assertSameOpen(cowOf(full, 40), 'two full areas')
  })

  it('snapshot: chunks at or above 2^32 take the one-by-one path, with the same result', async () => {
    const entries: Pair[] = Array.from({ length: 100 }, (_, i) => [i < 50 ? 2 ** 40 + i : 7 * i, nthDataChunk(CHUNK, i)])
    const { snap } = await assertSameOpen(cowOf(entries), 'old >= 2^32')
    assert.equal(snap.table.lookup(2 ** 40 + 3), nthDataChunk(CHUNK, 3))
    assert.equal(snap.table.size, 100)
  })

  it('snapshot: a duplicate origin chunk fails the same way, and before a later bad entry', async () => {
    const base = Array.from({ length: 100 }, (_, i): Pair => [3 * i, nthDataChunk(CHUNK, i)])
    const dup = base.map((e, i): Pair => (i === 70 ? [base[10]![0], e[1]] : e))
    const { error } = await assertSameOpen(cowOf(dup), 'duplicate')
    assert.equal((error as { code?: unknown }).code, 'SNAP_CORRUPT_METADATA')
    // a second duplicate earlier in sorted order but later in table order: the table-order one is named
    const twoDups = dup.map((e, i): Pair => (i === 90 ? [base[1]![0], e[1]] : e))
    await assertSameOpen(cowOf(twoDups), 'two duplicates')
    // an entry pointing outside the COW after the duplicate: the duplicate (earlier) is reported
    const dupThenBad = dup.map((e, i): Pair => (i === 95 ? [e[0], 10 ** 6] : e))
    const first = await assertSameOpen(cowOf(dupThenBad), 'duplicate, then bad COW chunk')
    assert.match((first.error as Error).message, /duplicate/)
    // and the other way round
    const badThenDup = dup.map((e, i): Pair => (i === 40 ? [e[0], 10 ** 6] : e))
    const second = await assertSameOpen(cowOf(badThenDup), 'bad COW chunk, then duplicate')
    assert.match((second.error as Error).message, /points outside/)
    // a value beyond 53 bits after a duplicate
    const dupThenHuge = dup.map((e, i): readonly [number | bigint, number | bigint] => (i === 80 ? [2n ** 60n, e[1]] : e))
    await assertSameOpen(cowOf(dupThenHuge), 'duplicate, then a 60-bit old chunk')
  })
})
