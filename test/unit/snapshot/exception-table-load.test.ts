/**
 * ExceptionTable at high load: a seeded randomized run against a plain Map (chunk -> COW chunk)
 * with crowded groups (hundreds of runs homed at one slot, so clusters run far past their homes
 * and deletions shift long clusters back), growth interleaved with removals, and every query;
 * and the memory bound of the layout (<= 16 bytes per exception at every size from 1e5 to 2e6
 * when nothing compresses), checked after every insert, so right after each growth too.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { ExceptionTable } from '../../../src/snapshot/exception-table.js'
import { Random } from '../../support/random.js'

function highLoadModelTest(seed: number, ops: number): void {
  const r = new Random(seed)
  const table = new ExceptionTable()
  const model = new Map<number, number>()
  const keys: number[] = []
  const keyAt = new Map<number, number>()
  let fresh = 10
  const add = (o: number, n: number) => {
    model.set(o, n)
    keyAt.set(o, keys.length)
    keys.push(o)
  }
  const drop = (o: number) => {
    model.delete(o)
    const k = keyAt.get(o)!
    const last = keys.pop()!
    if (last !== o) {
      keys[k] = last
      keyAt.set(last, k)
    }
    keyAt.delete(o)
  }
  // 40 crowded groups near 0, a band near 2^32, and chunks scattered over 2^44
  const crowded = () => Math.floor(r.int(40) * 256 + r.int(256))
  const chunk = (): number => {
    const s = r.int(10)
    if (s < 5) return crowded()
    if (s < 7) return 2 ** 32 - 20_000 + r.int(40_000)
    return r.int(2 ** 22) * 2 ** 22 + r.int(2 ** 22)
  }
  const mappedIn = (a: number, b: number): number => {
    for (let c = a; c < b; c++) if (model.has(c)) return c
    return b
  }
  const unmappedIn = (a: number, b: number): number => {
    for (let c = a; c < b; c++) if (!model.has(c)) return c
    return b
  }
  const check = (op: number) => {
    const msg = `seed ${seed} op ${op}`
    assert.equal(table.size, model.size, `${msg}: size`)
    let chunks = 0
    let runs = 0
    for (const run of table.runs()) {
      runs++
      chunks += run.count + 1
      assert.ok(Math.floor(run.old / 256) === Math.floor((run.old + run.count) / 256), `${msg}: run crosses a group`)
      for (let k = 0; k <= run.count; k++) {
        if (model.get(run.old + k) !== run.new + k) assert.fail(`${msg}: run ${JSON.stringify(run)} disagrees at ${run.old + k}`)
      }
    }
    assert.equal(runs, table.runCount, `${msg}: runCount`)
    assert.equal(chunks, model.size, `${msg}: chunks in runs`)
  }
  for (let op = 0; op < ops; op++) {
    const msg = `seed ${seed} op ${op}`
    const p = r.int(100)
    if (p < 45 || keys.length === 0) {
      const o = chunk()
      if (model.has(o)) {
        assert.throws(() => table.insert(o, fresh), /already mapped/, `${msg}: duplicate ${o}`)
        continue
      }
      // half the time continue a neighbour's COW chunk, so runs extend at either end
      let n = fresh++
      const q = r.int(4)
      if (q === 0 && model.has(o - 1)) n = model.get(o - 1)! + 1
      else if (q === 1 && model.has(o + 1) && model.get(o + 1)! > 0) n = model.get(o + 1)! - 1
      table.insert(o, n)
      add(o, n)
    } else if (p < 52) {
      const o = chunk()
      const count = 1 + r.int(r.int(4) === 0 ? 600 : 20)
      if (mappedIn(o, o + count) < o + count) continue
      const n = fresh
      fresh += count + r.int(3)
      table.insertRun(o, n, count)
      for (let k = 0; k < count; k++) add(o + k, n + k)
    } else if (p < 80) {
      const c = keys[r.int(keys.length)]!
      const run = table.lookupRun(c)!
      assert.ok(run !== null, `${msg}: lookupRun of mapped ${c}`)
      const q = r.int(10)
      if (q < 4) {
        table.remove(run.old + run.count)
        drop(run.old + run.count)
      } else if (q < 7) {
        table.remove(run.old)
        drop(run.old)
      } else if (q < 9) {
        // a merge batch: the run's top part, possibly the whole run and the run below it
        const from = Math.max(run.old - r.int(3), run.old + run.count - r.int(run.count + 3))
        let ok = true
        for (let x = from; x <= run.old + run.count; x++) if (!model.has(x)) ok = false
        if (!ok) continue
        const below = from < run.old ? table.lookupRun(from)! : null
        if (below !== null && below.old + below.count !== run.old - 1) continue
        table.removeRun(from, run.old + run.count + 1 - from)
        for (let x = from; x <= run.old + run.count; x++) drop(x)
      } else if (run.count >= 2) {
        const mid = run.old + 1 + r.int(run.count - 1)
        assert.throws(() => table.remove(mid), /middle of a run/, `${msg}: middle remove`)
      }
    } else {
      for (let k = 0; k < 6; k++) {
        const c = r.int(2) === 0 && keys.length > 0 ? keys[r.int(keys.length)]! + r.int(5) - 2 : chunk()
        if (c < 0) continue
        assert.equal(table.lookup(c), model.get(c) ?? -1, `${msg}: lookup ${c}`)
        assert.equal(table.has(c), model.has(c), `${msg}: has ${c}`)
        const run = table.lookupRun(c)
        if (run === null) assert.equal(model.has(c), false, `${msg}: lookupRun ${c}`)
        else assert.ok(run.old <= c && c <= run.old + run.count && model.get(run.old) === run.new, `${msg}: lookupRun ${c}`)
        const end = c + 1 + r.int(1200)
        assert.equal(table.nextMapped(c, end), mappedIn(c, end), `${msg}: nextMapped(${c}, ${end})`)
        assert.equal(table.nextUnmapped(c, end), unmappedIn(c, end), `${msg}: nextUnmapped(${c}, ${end})`)
        const got = table.mappedRun(c, end)
        if (!model.has(c)) assert.equal(got, null, `${msg}: mappedRun(${c})`)
        else {
          const cow = model.get(c)!
          let count = 1
          while (c + count < end && model.get(c + count) === cow + count) count++
          assert.deepEqual(got, { cow, count }, `${msg}: mappedRun(${c}, ${end})`)
        }
      }
    }
    if (op % 2000 === 0) check(op)
  }
  check(ops)
  // drain through the merge path, so the last deletions empty the crowded clusters
  for (const run of [...table.runs()]) table.removeRun(run.old, run.count + 1)
  assert.equal(table.size, 0, `seed ${seed}: size after drain`)
  assert.equal(table.runCount, 0, `seed ${seed}: runCount after drain`)
  for (const c of keys.slice(0, 2000)) assert.equal(table.lookup(c), -1, `seed ${seed}: ${c} after drain`)
}

for (const seed of [1, 2, 3, 4]) {
  test(`exception-table: high load against a Map, crowded groups, growth and deletions in long clusters (seed ${seed})`, () => {
    highLoadModelTest(seed, 40_000)
  })
}

test('exception-table: <= 16 bytes per exception at every size from 1e5 to 2e6 random inserts', () => {
  const r = new Random(77)
  for (const [name, oldOf] of [
    // every exception its own group
    ['sparse', () => r.int(2 ** 22) * 2 ** 22 + r.int(2 ** 22)],
    // ~40% of a 2^23-chunk device: about 100 runs per group, nothing compresses
    ['dense', () => r.int(2 ** 23)],
  ] as const) {
    const t = new ExceptionTable()
    let worst = 0
    let cow = 0
    while (t.size < 2_000_000) {
      const o = oldOf()
      if (t.has(o)) continue
      // COW chunks two apart: neighbours in the origin never extend each other's run
      t.insert(o, (cow += 2))
      if (t.size >= 100_000) worst = Math.max(worst, t.memoryBytes() / t.size)
    }
    assert.equal(t.runCount, t.size, `${name}: nothing compressed`)
    assert.ok(worst <= 16, `${name}: ${worst.toFixed(2)} bytes per exception at worst`)
  }
})
