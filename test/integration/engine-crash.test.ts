/**
 * Crash consistency: origin and COW devices share one recorded timeline; the log is cut at many
 * points (unflushed writes dropped, kept at random, or torn), the volume is reopened from the
 * images, and every persistent view must equal its content at the last completed sync point,
 * except bytes written after that point, which may hold any of those later values. A snapshot
 * that reads data the origin got after the snapshot was taken is "silently wrong" and fails.
 * The trace and the checks live in test/support/engine-crash-trace.ts (npm run torture runs
 * many more of them).
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { SnapshotSpec } from '../support/engine-stack.js'
import { checkEngineCut, chooseCuts, recordEngineTrace } from '../support/engine-crash-trace.js'
import { Random } from '../support/random.js'

const ORIGIN_BYTES = 96 * 1024 + 512
const SPECS: SnapshotSpec[] = [
  { name: 'p512', kind: 'P', chunkBytes: 512, cowBytes: 2 * 1024 * 1024 },
  { name: 'p4k', kind: 'P', chunkBytes: 4096, cowBytes: 2 * 1024 * 1024 },
  { name: 'po64k', kind: 'PO', chunkBytes: 65536, cowBytes: 2 * 1024 * 1024 },
  { name: 'n4k', kind: 'N', chunkBytes: 4096, cowBytes: 2 * 1024 * 1024 },
]

test('engine crash: every cut of the write log reopens to a consistent state', async () => {
  let cuts = 0
  for (const seed of [101, 202, 303]) {
    const trace = await recordEngineTrace({ seed, originBytes: ORIGIN_BYTES, specs: SPECS, steps: 30 })
    for (const name of ['p512', 'p4k', 'po64k']) assert.ok(!trace.invalidated.has(name), `seed ${seed}: ${name} invalid before the crash`)
    for (const cut of chooseCuts(trace, 120, new Random(seed))) {
      await checkEngineCut(trace, cut, { unflushed: 'drop' }, `seed ${seed} cut ${cut} drop`)
      await checkEngineCut(trace, cut, { unflushed: 'random', seed: cut, tear: true }, `seed ${seed} cut ${cut} random+tear`)
      cuts += 2
    }
  }
  assert.ok(cuts >= 400, `only ${cuts} cut points`)
  console.log(`# engine crash: ${cuts} cut points checked`)
})
