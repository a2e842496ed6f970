/**
 * exceptionRunsIn (issue 17): the complete exceptions inside a window of origin chunks, as sorted
 * runs, by either strategy (probing the window, or scanning the table), against a Map model.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { exceptionRunsIn } from '../../../src/snapshot/exception-runs.js'
import { ExceptionTable } from '../../../src/snapshot/exception-table.js'
import { Random } from '../../support/random.js'

test('exceptionRunsIn matches a model for random tables and windows, small and large', () => {
  for (const seed of [7, 8, 9, 10]) {
    const rnd = new Random(seed)
    const table = new ExceptionTable()
    const model = new Map<number, number>()
    let nextCow = 2
    for (let i = 0; i < 400; i++) {
      // Sequential bursts (which compress into runs, across 256-chunk groups) and scattered chunks.
      const start = rnd.int(5000)
      const burst = rnd.int(3) === 0 ? 1 + rnd.int(300) : 1
      for (let c = start; c < start + burst; c++) {
        if (model.has(c)) continue
        table.insert(c, nextCow)
        model.set(c, nextCow++)
      }
    }
    for (let q = 0; q < 100; q++) {
      const first = rnd.int(5400)
      // Narrow windows probe chunk by chunk; wide ones scan the table.
      const end = first + (q % 2 === 0 ? 1 + rnd.int(50) : 1 + rnd.int(6000))
      const runs = exceptionRunsIn(table, first, end)
      const got: Array<[number, number]> = []
      for (const r of runs) {
        assert.ok(r.chunks >= 1)
        for (let k = 0; k < r.chunks; k++) got.push([r.oldChunk + k, r.newChunk + k])
      }
      const want = [...model].filter(([old]) => old >= first && old < end).sort((a, b) => a[0] - b[0])
      assert.deepEqual(got, want, `seed ${seed} window [${first}, ${end})`)
      for (let i = 1; i < runs.length; i++) {
        const a = runs[i - 1]!
        const b = runs[i]!
        assert.ok(a.oldChunk + a.chunks <= b.oldChunk, 'sorted, not overlapping')
        assert.ok(!(a.oldChunk + a.chunks === b.oldChunk && a.newChunk + a.chunks === b.newChunk), 'runs that continue each other are joined')
      }
    }
  }
})
