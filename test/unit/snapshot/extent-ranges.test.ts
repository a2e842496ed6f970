/**
 * The extent engine's range structures against plain per-chunk models (randomized, seeded):
 * RangeTracker (in-flight ranges), ExtentList (pending copies) and the ExceptionTable's range
 * operations (insertRun, removeRun, nextMapped, nextUnmapped, mappedRun).
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { ExceptionTable } from '../../../src/snapshot/exception-table.js'
import { type Extent, ExtentList } from '../../../src/snapshot/extent-list.js'
import { RangeTracker, type TrackedRange } from '../../../src/snapshot/range-tracker.js'
import { Random } from '../../support/random.js'

const SEEDS = [1, 2, 3, 4, 5, 6, 7, 8]

test('RangeTracker answers overlap queries and drains like a per-chunk count', async () => {
  for (const seed of SEEDS) {
    const random = new Random(seed)
    const tracker = new RangeTracker()
    const counts = new Map<number, number>() // the model: requests in flight per chunk
    const live: TrackedRange[] = []
    const SPACE = 600
    const modelOverlaps = (s: number, e: number) => {
      for (let c = s; c < e; c++) if ((counts.get(c) ?? 0) > 0) return true
      return false
    }
    for (let op = 0; op < 3000; op++) {
      const what = `seed ${seed} op ${op}`
      if (live.length === 0 || random.chance(0.55)) {
        const s = random.int(SPACE)
        const e = Math.min(SPACE, s + 1 + (random.chance(0.1) ? random.int(200) : random.int(8)))
        live.push(tracker.add(s, e))
        for (let c = s; c < e; c++) counts.set(c, (counts.get(c) ?? 0) + 1)
      } else {
        const at = random.int(live.length)
        const entry = live.splice(at, 1)[0] as TrackedRange
        // a drain over the entry's range resolves only once nothing overlapping is left
        let drained = false
        const waitsFor = modelOverlaps(entry.start, entry.end)
        void tracker.drain(entry.start, entry.end).then(() => (drained = true))
        tracker.remove(entry)
        for (let c = entry.start; c < entry.end; c++) counts.set(c, (counts.get(c) as number) - 1)
        await new Promise((r) => setImmediate(r))
        assert.ok(waitsFor, `${what}: the entry itself was tracked`)
        assert.equal(drained, !modelOverlaps(entry.start, entry.end), `${what}: drain settled iff nothing overlaps any more`)
      }
      for (let k = 0; k < 4; k++) {
        const s = random.int(SPACE)
        const e = s + 1 + random.int(40)
        assert.equal(tracker.overlaps(s, e), modelOverlaps(s, e), `${what}: overlaps(${s}, ${e})`)
      }
      assert.equal(tracker.size, live.length)
    }
    // everything removed: every drain is immediate
    for (const entry of live.splice(0)) tracker.remove(entry)
    assert.equal(tracker.overlaps(0, SPACE), false)
  }
})

test('RangeTracker.drain waits for ranges added after it started', async () => {
  const tracker = new RangeTracker()
  const a = tracker.add(0, 10)
  let done = false
  void tracker.drain(5, 6).then(() => (done = true))
  const b = tracker.add(4, 8)
  tracker.remove(a)
  await new Promise((r) => setImmediate(r))
  assert.equal(done, false, 'b still overlaps')
  tracker.remove(b)
  await new Promise((r) => setImmediate(r))
  assert.equal(done, true)
})

/**
 * One seeded step on an ExtentList and its per-chunk owner map: with `insertChance`, insert an
 * extent at a random chunk below `space` (refused, and left out of the map, when it overlaps);
 * otherwise remove a random extent from both.
 */
function insertOrRemove(list: ExtentList<Extent>, owner: Map<number, Extent>, random: Random, insertChance: number, space: number, drawCount: () => number, what: string): void {
  if (random.chance(insertChance)) {
    const firstChunk = random.int(space)
    const count = drawCount()
    const e = { firstChunk, count }
    let free = true
    for (let c = firstChunk; c < firstChunk + count; c++) if (owner.has(c)) free = false
    if (free) {
      list.insert(e)
      for (let c = firstChunk; c < firstChunk + count; c++) owner.set(c, e)
    } else {
      assert.throws(() => list.insert(e), /overlaps/, `${what}: overlapping insert refused`)
    }
  } else if (list.size > 0) {
    const e = list.values()[random.int(list.size)] as Extent
    list.remove(e)
    for (let c = e.firstChunk; c < e.firstChunk + e.count; c++) owner.delete(c)
  }
}

/** find(c) and firstFrom(c) agree with the owner map (whose chunks all lie below `limit`). */
function checkAgainstOwner(list: ExtentList<Extent>, owner: Map<number, Extent>, c: number, limit: number, what: string): void {
  assert.equal(list.find(c), owner.get(c) ?? null, `${what}: find(${c})`)
  let next: Extent | null = null
  for (let d = c; d < limit && next === null; d++) next = owner.get(d) ?? null
  assert.equal(list.firstFrom(c), next, `${what}: firstFrom(${c})`)
}

test('ExtentList keeps disjoint extents found by search, as a per-chunk owner map', () => {
  for (const seed of SEEDS) {
    const random = new Random(seed)
    const list = new ExtentList<Extent>()
    const owner = new Map<number, Extent>()
    const SPACE = 2000
    for (let op = 0; op < 4000; op++) {
      const what = `seed ${seed} op ${op}`
      insertOrRemove(list, owner, random, 0.5, SPACE, () => 1 + random.int(random.chance(0.2) ? 100 : 6), what)
      for (let k = 0; k < 4; k++) checkAgainstOwner(list, owner, random.int(SPACE + 10), SPACE + 200, what)
    }
  }
})

test('ExtentList with thousands of extents (many pages, split and emptied) agrees with a per-chunk owner map', () => {
  for (const seed of SEEDS) {
    const random = new Random(seed)
    const list = new ExtentList<Extent>()
    const owner = new Map<number, Extent>()
    const SPACE = 12000
    let largest = 0
    // Mostly inserts, then mostly removals: the list grows to thousands of extents and drains again.
    for (let op = 0; op < 16000; op++) {
      const what = `seed ${seed} op ${op}`
      insertOrRemove(list, owner, random, op < 8000 ? 0.8 : 0.2, SPACE, () => 1 + random.int(4), what)
      largest = Math.max(largest, list.size)
      checkAgainstOwner(list, owner, random.int(SPACE + 10), SPACE + 10, what)
    }
    assert.ok(largest > 1000, `seed ${seed}: the list reached ${largest} extents`)
    const values = list.values()
    assert.equal(values.length, list.size)
    for (let i = 1; i < values.length; i++) {
      const a = values[i - 1] as Extent
      assert.ok(a.firstChunk + a.count <= (values[i] as Extent).firstChunk, `seed ${seed}: values() in order`)
    }
  }
})

test('ExceptionTable range operations agree with a per-chunk map and leave the runs per-chunk inserts leave', () => {
  for (const seed of SEEDS) {
    const random = new Random(seed)
    const table = new ExceptionTable()
    const oneByOne = new ExceptionTable() // the same operations a chunk at a time
    const model = new Map<number, number>()
    // far from 0 and across a 2^32 group boundary now and then
    const base = random.chance(0.5) ? 0 : 2 ** 32 * 256 - 3000
    const SPACE = 6000
    let nextCow = 5
    for (let op = 0; op < 1500; op++) {
      const what = `seed ${seed} op ${op}`
      const r = random.next()
      if (r < 0.45) {
        const old = base + random.int(SPACE)
        const count = 1 + random.int(random.chance(0.3) ? 600 : 20)
        let free = true
        for (let c = old; c < old + count; c++) if (model.has(c)) free = false
        // sometimes continue the COW of the run just below, like sequential allocation
        const below = model.get(old - 1)
        const cow = below !== undefined && random.chance(0.5) && below + 1 >= nextCow ? below + 1 : nextCow
        if (!free) {
          assert.throws(() => table.insertRun(old, cow, count), /already mapped/, `${what}: insertRun over a mapped chunk`)
          // whole groups before the refused one may have gone in: redo the model from the table
          for (let c = old; c < old + count; c++) {
            if (model.has(c)) continue
            const got = table.lookup(c)
            if (got !== -1) {
              model.set(c, got)
              oneByOne.insert(c, got)
            }
          }
          nextCow = Math.max(nextCow, cow + count)
          continue
        }
        table.insertRun(old, cow, count)
        for (let k = 0; k < count; k++) {
          oneByOne.insert(old + k, cow + k)
          model.set(old + k, cow + k)
        }
        nextCow = Math.max(nextCow, cow + count) + (random.chance(0.3) ? 1 : 0)
      } else if (r < 0.6 && model.size > 0) {
        // remove the tail of a run, highest first, as a merge does
        const runs = [...oneByOne.runs()]
        const run = runs[random.int(runs.length)]!
        const keep = random.int(run.count + 1)
        const first = run.old + keep
        const count = run.count + 1 - keep
        table.removeRun(first, count)
        for (let c = first + count - 1; c >= first; c--) {
          oneByOne.remove(c)
          model.delete(c)
        }
      }
      assert.equal(table.size, model.size, `${what}: size`)
      assert.equal(table.runCount, oneByOne.runCount, `${what}: run count`)
      for (let k = 0; k < 6; k++) {
        const s = base + random.int(SPACE)
        const e = s + random.int(random.chance(0.2) ? 2000 : 300)
        let firstMapped = e
        for (let c = s; c < e; c++) {
          if (model.has(c)) {
            firstMapped = c
            break
          }
        }
        let firstUnmapped = e
        for (let c = s; c < e; c++) {
          if (!model.has(c)) {
            firstUnmapped = c
            break
          }
        }
        assert.equal(table.nextMapped(s, e), firstMapped, `${what}: nextMapped(${s}, ${e})`)
        assert.equal(table.nextUnmapped(s, e), firstUnmapped, `${what}: nextUnmapped(${s}, ${e})`)
        const run = table.mappedRun(s, Math.max(e, s + 1))
        if (!model.has(s)) {
          assert.equal(run, null, `${what}: mappedRun of an unmapped chunk`)
        } else {
          let n = 1
          while (s + n < Math.max(e, s + 1) && model.get(s + n) === (model.get(s) as number) + n) n++
          assert.deepEqual(run, { cow: model.get(s), count: n }, `${what}: mappedRun(${s})`)
        }
      }
    }
    for (const run of oneByOne.runs()) {
      assert.deepEqual(table.lookupRun(run.old), run, `seed ${seed}: same run structure as one-by-one inserts`)
    }
  }
})

test('ExceptionTable.removeRun refuses the middle of a run as remove() does', () => {
  const table = new ExceptionTable()
  table.insertRun(10, 100, 20)
  assert.throws(() => table.removeRun(12, 3), /middle of a run/)
  table.removeRun(25, 5)
  assert.equal(table.size, 15)
  assert.deepEqual(table.lookupRun(10), { old: 10, new: 100, count: 14 })
})
