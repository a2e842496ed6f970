import { test } from 'node:test'
import assert from 'node:assert/strict'
import { ExceptionTable, MAX_COW_CHUNK, MAX_ORIGIN_CHUNK, type ExceptionRun } from '../../../src/snapshot/exception-table.js'
import { isSnapError } from '../../../src/errors.js'

// Tiny seeded PRNG (mulberry32): failures must replay from the seed printed in the message.
function prng(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

interface Run {
  old: number
  new: number
  count: number
}

/**
 * A literal transcription of the kernel's algorithm (sorted bucket list walk), keyed by group,
 * so the run STRUCTURE is checked too, not just the chunk mapping.
 */
class KernelModel {
  readonly groups = new Map<number, Run[]>()

  insert(o: number, n: number): void {
    const g = Math.floor(o / 256)
    let list = this.groups.get(g)
    if (!list) this.groups.set(g, (list = []))
    let at = list.length
    for (let k = 0; k < list.length; k++) {
      const e = list[k]!
      if (o === e.old + e.count + 1 && n === e.new + e.count + 1) {
        e.count++
        return
      }
      if (o === e.old - 1 && n === e.new - 1) {
        e.count++
        e.old--
        e.new--
        return
      }
      if (o < e.old) {
        at = k
        break
      }
    }
    list.splice(at, 0, { old: o, new: n, count: 0 })
  }

  find(c: number): Run | undefined {
    return this.groups.get(Math.floor(c / 256))?.find((e) => e.old <= c && c <= e.old + e.count)
  }

  remove(c: number): void {
    const g = Math.floor(c / 256)
    const list = this.groups.get(g)!
    const k = list.findIndex((e) => e.old <= c && c <= e.old + e.count)
    const e = list[k]!
    if (e.count === 0) {
      list.splice(k, 1)
      if (list.length === 0) this.groups.delete(g)
    } else if (c === e.old) {
      e.old++
      e.new++
      e.count--
    } else if (c === e.old + e.count) {
      e.count--
    } else {
      throw new Error('model: middle removal')
    }
  }

  runs(): Run[] {
    return [...this.groups.values()].flat().map((e) => ({ ...e }))
  }
}

const byOld = (a: ExceptionRun, b: ExceptionRun) => a.old - b.old
const sortedRuns = (t: ExceptionTable) => [...t.runs()].map((r) => ({ ...r })).sort(byOld)

function codeOf(fn: () => void): string | undefined {
  try {
    fn()
  } catch (err) {
    return isSnapError(err) ? err.code : 'not-a-SnapError'
  }
  return undefined
}

function modelTest(seed: number, base: number, range: number, newBase: number, ops: number): void {
  const rnd = prng(seed)
  const table = new ExceptionTable()
  const kernel = new KernelModel()
  const model = new Map<number, number>()
  const keys: number[] = []
  const keyIndex = new Map<number, number>()
  let fresh = newBase
  const pick = (n: number) => Math.floor(rnd() * n)
  const dropKey = (c: number) => {
    const k = keyIndex.get(c)!
    const last = keys.pop()!
    if (last !== c) {
      keys[k] = last
      keyIndex.set(last, k)
    }
    keyIndex.delete(c)
  }
  const fullCheck = (op: number) => {
    const msg = `seed ${seed} op ${op}`
    assert.equal(table.size, model.size, `${msg}: size`)
    assert.deepEqual(sortedRuns(table), kernel.runs().sort(byOld), `${msg}: runs`)
    assert.equal(table.runCount, kernel.runs().length, `${msg}: runCount`)
    const seen = new Map<number, number>()
    table.forEachChunk((o, n) => {
      assert.ok(!seen.has(o), `${msg}: chunk ${o} visited twice`)
      seen.set(o, n)
    })
    assert.deepEqual(seen, model, `${msg}: forEachChunk`)
  }

  for (let op = 0; op < ops; op++) {
    const r = rnd()
    const msg = `seed ${seed} op ${op}`
    if (r < 0.55 || keys.length === 0) {
      const o = base + pick(range)
      if (model.has(o)) {
        assert.throws(() => table.insert(o, fresh), Error, `${msg}: duplicate insert of ${o}`)
        continue
      }
      let n = fresh++
      const s = rnd()
      const below = model.get(o - 1)
      const above = model.get(o + 1)
      if (s < 0.5 && below !== undefined && below + 1 < MAX_COW_CHUNK) n = below + 1
      else if (s < 0.7 && above !== undefined && above > 0) n = above - 1
      table.insert(o, n)
      kernel.insert(o, n)
      model.set(o, n)
      keyIndex.set(o, keys.length)
      keys.push(o)
    } else if (r < 0.8) {
      const c = keys[pick(keys.length)]!
      const e = kernel.find(c)!
      const s = rnd()
      if (s < 0.1 && e.count >= 2) {
        // middle of a run: refused, nothing changes
        const mid = e.old + 1 + pick(e.count - 1)
        assert.equal(codeOf(() => table.remove(mid)), 'SNAP_CORRUPT_METADATA', `${msg}: middle remove ${mid}`)
        assert.equal(table.lookup(mid), model.get(mid), `${msg}: after refused middle remove`)
        continue
      }
      const victim = s < 0.6 ? e.old + e.count : e.old
      table.remove(victim)
      kernel.remove(victim)
      model.delete(victim)
      dropKey(victim)
    } else if (r < 0.83) {
      let c = base + pick(range)
      while (model.has(c)) c = base + pick(range)
      assert.equal(codeOf(() => table.remove(c)), 'SNAP_CORRUPT_METADATA', `${msg}: remove of unmapped ${c}`)
    } else {
      for (let k = 0; k < 8; k++) {
        const c = base + pick(range)
        assert.equal(table.lookup(c), model.get(c) ?? -1, `${msg}: lookup ${c}`)
        const run = table.lookupRun(c)
        const e = kernel.find(c)
        assert.deepEqual(run === null ? null : { ...run }, e ? { ...e } : null, `${msg}: lookupRun ${c}`)
      }
    }
    if (op % 500 === 0) fullCheck(op)
  }
  fullCheck(ops)
  // drain the table through the merge path: highest chunk of each run first
  for (const e of kernel.runs()) {
    for (let c = e.old + e.count; c >= e.old; c--) {
      table.remove(c)
      model.delete(c)
    }
  }
  assert.equal(table.size, 0, `seed ${seed}: size after drain`)
  assert.equal(table.runCount, 0, `seed ${seed}: runCount after drain`)
  assert.equal([...table.runs()].length, 0, `seed ${seed}: runs after drain`)
}

test('exception-table: model-based, dense chunks (heavy compression)', () => {
  for (let seed = 1; seed <= 12; seed++) modelTest(seed, 0, 1500, 0, 6000)
})

test('exception-table: model-based, sparse chunks (many groups, growth, backward shifts)', () => {
  for (let seed = 101; seed <= 108; seed++) modelTest(seed, 1000, 256 * 3000, 5000, 12000)
})

test('exception-table: model-based, near the top of the chunk ranges', () => {
  for (let seed = 201; seed <= 204; seed++) {
    modelTest(seed, MAX_ORIGIN_CHUNK - 4000, 4000, MAX_COW_CHUNK - 2 ** 20, 6000)
    modelTest(seed, 2 ** 32 - 2000, 4000, 2 ** 32 - 3000, 6000)
  }
})

test('exception-table: 256 sequential inserts compress into one run', () => {
  const t = new ExceptionTable()
  for (let i = 0; i < 256; i++) t.insert(512 + i, 9000 + i)
  assert.equal(t.runCount, 1)
  assert.equal(t.size, 256)
  assert.deepEqual(sortedRuns(t), [{ old: 512, new: 9000, count: 255 }])
  for (let i = 0; i < 256; i++) assert.equal(t.lookup(512 + i), 9000 + i)
  assert.equal(t.lookup(511), -1)
  assert.equal(t.lookup(768), -1)
})

test('exception-table: 257 sequential inserts split at the group boundary', () => {
  const t = new ExceptionTable()
  for (let i = 0; i < 257; i++) t.insert(i, 100 + i)
  assert.deepEqual(sortedRuns(t), [
    { old: 0, new: 100, count: 255 },
    { old: 256, new: 356, count: 0 },
  ])
  // an unaligned start splits where the group ends, not after 256 chunks
  const u = new ExceptionTable()
  for (let i = 0; i < 257; i++) u.insert(200 + i, i)
  assert.deepEqual(sortedRuns(u), [
    { old: 200, new: 0, count: 55 },
    { old: 256, new: 56, count: 200 },
  ])
  assert.equal(u.size, 257)
})

test('exception-table: front extension, and neither extension crosses a group', () => {
  const t = new ExceptionTable()
  t.insert(10, 110)
  t.insert(9, 109)
  t.insert(8, 108)
  assert.deepEqual(sortedRuns(t), [{ old: 8, new: 108, count: 2 }])
  assert.equal(t.lookup(9), 109)

  const g = new ExceptionTable()
  g.insert(256, 1000)
  g.insert(255, 999) // consecutive in both numbers but in the previous group
  g.insert(511, 1255)
  g.insert(512, 1256) // same, at the top end
  assert.equal(g.runCount, 4)

  // the COW side must be consecutive too
  const n = new ExceptionTable()
  n.insert(10, 100)
  n.insert(11, 200)
  n.insert(9, 50)
  assert.equal(n.runCount, 3)
})

test('exception-table: filling a gap extends only the lower run', () => {
  const t = new ExceptionTable()
  t.insert(10, 100)
  t.insert(12, 102)
  t.insert(11, 101)
  assert.deepEqual(sortedRuns(t), [
    { old: 10, new: 100, count: 1 },
    { old: 12, new: 102, count: 0 },
  ])
  // when only the upper run matches on the COW side, it is the one extended
  const u = new ExceptionTable()
  u.insert(10, 500)
  u.insert(12, 102)
  u.insert(11, 101)
  assert.deepEqual(sortedRuns(u), [
    { old: 10, new: 500, count: 0 },
    { old: 11, new: 101, count: 1 },
  ])
})

test('exception-table: inserting a mapped chunk is a programming error', () => {
  const t = new ExceptionTable()
  for (let i = 0; i < 5; i++) t.insert(i, i)
  assert.throws(() => t.insert(3, 77), /already mapped/)
  assert.throws(() => t.insert(4, 4), /already mapped/)
  assert.equal(t.size, 5)
})

test('exception-table: removal from run ends, and its two error codes', () => {
  const t = new ExceptionTable()
  for (let i = 0; i < 6; i++) t.insert(20 + i, 40 + i) // [20 - 25] -> [40 - 45]
  t.insert(100, 7)

  assert.throws(() => t.remove(26), (err) => isSnapError(err, 'SNAP_CORRUPT_METADATA') && /chunk 26 is not in memory/.test(err.message))
  assert.throws(
    () => t.remove(22),
    (err) => isSnapError(err, 'SNAP_CORRUPT_METADATA') && err.message === 'attempt to merge chunk 22 from the middle of a run [20 - 25]',
  )

  t.remove(25) // top end
  assert.deepEqual(t.lookupRun(20), { old: 20, new: 40, count: 4 })
  t.remove(20) // bottom end
  assert.deepEqual(t.lookupRun(21), { old: 21, new: 41, count: 3 })
  assert.equal(t.lookup(20), -1)
  assert.equal(t.lookup(21), 41)
  t.remove(100) // count 0: the run goes
  assert.equal(t.runCount, 1)
  assert.equal(t.size, 4)
  assert.equal(t.has(100), false)
  for (let c = 24; c >= 21; c--) t.remove(c)
  assert.equal(t.size, 0)
  assert.equal(t.runCount, 0)
})

test('exception-table: out-of-range chunk numbers', () => {
  const t = new ExceptionTable()
  assert.equal(codeOf(() => t.insert(MAX_ORIGIN_CHUNK, 0)), 'SNAP_OUT_OF_RANGE')
  assert.equal(codeOf(() => t.insert(0, MAX_COW_CHUNK)), 'SNAP_OUT_OF_RANGE')
  assert.equal(codeOf(() => t.insert(-1, 0)), 'SNAP_OUT_OF_RANGE')
  assert.equal(codeOf(() => t.insert(1.5, 0)), 'SNAP_OUT_OF_RANGE')
  assert.equal(codeOf(() => t.insert(0, Number.NaN)), 'SNAP_OUT_OF_RANGE')
  assert.equal(codeOf(() => t.remove(MAX_ORIGIN_CHUNK)), 'SNAP_OUT_OF_RANGE')
  assert.equal(t.size, 0)
  // lookups of impossible chunks are simply misses
  assert.equal(t.lookup(MAX_ORIGIN_CHUNK), -1)
  assert.equal(t.lookup(-1), -1)
  assert.equal(t.lookup(0.5), -1)
})

test('exception-table: large chunk numbers round-trip', () => {
  const t = new ExceptionTable()
  const pairs: Array<[number, number]> = [
    [MAX_ORIGIN_CHUNK - 1, MAX_COW_CHUNK - 1],
    [MAX_ORIGIN_CHUNK - 256, MAX_COW_CHUNK - 1000],
    [2 ** 32 - 1, 2 ** 32 - 1],
    [2 ** 32, 2 ** 32],
    [2 ** 36 + 5, 2 ** 39 + 3],
    [2 ** 40 * 3 + 129, 2 ** 33 + 77],
    [0, 0],
  ]
  for (const [o, n] of pairs) t.insert(o, n)
  // front extension that moves the COW start below a 2^32 boundary
  t.insert(2 ** 32 + 1, 2 ** 32 + 1)
  t.insert(2 ** 36 + 4, 2 ** 39 + 2)
  assert.equal(t.lookup(2 ** 32 + 1), 2 ** 32 + 1)
  assert.deepEqual(t.lookupRun(2 ** 36 + 5), { old: 2 ** 36 + 4, new: 2 ** 39 + 2, count: 1 })
  for (const [o, n] of pairs) {
    assert.equal(t.lookup(o), n, `lookup ${o}`)
    assert.equal(t.has(o), true)
  }
  // same low 32 bits of the group number, different high bits: must not alias
  for (const c of [2 ** 36 + 5 + 2 ** 40, MAX_ORIGIN_CHUNK - 1 - 2 ** 40, 2 ** 32 + 2 ** 40, 2 ** 40 + 129]) {
    assert.equal(t.lookup(c), -1, `alias ${c}`)
  }
  const chunks = new Map<number, number>()
  t.forEachChunk((o, n) => chunks.set(o, n))
  assert.equal(chunks.size, t.size)
  for (const [o, n] of pairs) assert.equal(chunks.get(o), n)
  assert.ok(sortedRuns(t).some((r) => r.old === MAX_ORIGIN_CHUNK - 1 && r.new === MAX_COW_CHUNK - 1))
  // COW start crossing 2^32 going up when the bottom of a run is merged
  const u = new ExceptionTable()
  u.insert(1000, 2 ** 32 - 1)
  u.insert(1001, 2 ** 32)
  u.remove(1000)
  assert.deepEqual(u.lookupRun(1001), { old: 1001, new: 2 ** 32, count: 0 })
  for (const [o] of pairs) t.remove(o)
  assert.equal(t.size, 2)
})

test('exception-table: growth across many resizes keeps every mapping', () => {
  const t = new ExceptionTable()
  const n = 300_000
  // old = bijective scramble of i, new = i: distinct chunks that never compress
  const oldOf = (i: number) => {
    let x = Math.imul(i ^ 0x5bd1e995, 0x27d4eb2d)
    x ^= x >>> 15
    return (x >>> 0) * 16 + (i & 15)
  }
  let resizes = 0
  let bytes = t.memoryBytes()
  for (let i = 0; i < n; i++) {
    t.insert(oldOf(i), i)
    if (t.memoryBytes() !== bytes) {
      resizes++
      bytes = t.memoryBytes()
    }
  }
  assert.ok(resizes >= 20, `only ${resizes} resizes`)
  assert.equal(t.size, n)
  assert.equal(t.runCount, n)
  for (let i = 0; i < n; i++) assert.equal(t.lookup(oldOf(i)), i)
  // remove every other one (backward shifts everywhere), the rest must survive
  for (let i = 0; i < n; i += 2) t.remove(oldOf(i))
  for (let i = 0; i < n; i++) assert.equal(t.lookup(oldOf(i)), i % 2 === 0 ? -1 : i)
  t.clear()
  assert.equal(t.size, 0)
  assert.equal(t.lookup(oldOf(1)), -1)
  t.insert(5, 5)
  assert.equal(t.lookup(5), 5)
})

test('exception-table: <= 24 bytes per exception for 1e6 random inserts', () => {
  const rnd = prng(42)
  const t = new ExceptionTable()
  const n = 1_000_000
  let worst = 0
  for (let i = 0; i < n; i++) {
    // random old in 2^44 (collisions are astronomically unlikely but must not fail the test)
    const o = Math.floor(rnd() * 2 ** 22) * 2 ** 22 + Math.floor(rnd() * 2 ** 22)
    if (t.has(o)) continue
    t.insert(o, Math.floor(rnd() * MAX_COW_CHUNK))
    if (t.size >= 64) worst = Math.max(worst, t.memoryBytes() / t.size)
  }
  assert.ok(t.size > n - 10)
  assert.ok(t.memoryBytes() / t.size <= 24, `${t.memoryBytes() / t.size} bytes/exception at the end`)
  assert.ok(worst <= 24, `${worst} bytes/exception at worst`)
})
