/**
 * Crash tests for the merge (reference §8.8, invariant 48): for every cut point of a recorded
 * merge (test/support/merge-crash-case.ts), reopening resumes the merge to the same final
 * origin and leaves the other snapshots intact. npm run torture runs many more random cases.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { type CrashCase, checkMergeCut, mergeCuts, recordMergeCase } from '../support/merge-crash-case.js'

const KiB = 1024

const CASES: CrashCase[] = [
  {
    seed: 31,
    originBytes: 256 * KiB + 1536,
    specs: [
      { name: 'a', kind: 'P', chunkBytes: 64 * KiB, cowBytes: 2048 * KiB },
      { name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 1024 * KiB },
      { name: 'b', kind: 'PO', chunkBytes: 4 * KiB, cowBytes: 1024 * KiB },
      { name: 'c', kind: 'P', chunkBytes: 16 * KiB, cowBytes: 1024 * KiB },
    ],
    originWrites: 30,
    cutStride: 1,
  },
  {
    seed: 32,
    originBytes: 512 * KiB + 512,
    specs: [
      { name: 'b', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 2048 * KiB },
      { name: 'm', kind: 'PO', chunkBytes: 16 * KiB, cowBytes: 2048 * KiB },
      { name: 'a', kind: 'P', chunkBytes: 32 * KiB, cowBytes: 2048 * KiB },
      { name: 'c', kind: 'P', chunkBytes: 64 * KiB, cowBytes: 2048 * KiB },
    ],
    originWrites: 40,
    cutStride: 1,
    // Small batches of several runs: many steps, so cuts land in every phase of a step.
    maxStepChunks: 3,
  },
  {
    // More exceptions than one metadata area holds (E = 256 for 4 KiB chunks): the first step
    // spans two areas. Sampled cut points.
    seed: 33,
    originBytes: 1280 * KiB + 1536,
    specs: [
      { name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 2048 * KiB },
      { name: 'a', kind: 'P', chunkBytes: 8 * KiB, cowBytes: 4096 * KiB },
      { name: 'c', kind: 'PO', chunkBytes: 64 * KiB, cowBytes: 4096 * KiB },
    ],
    originWrites: 290,
    cutStride: 5,
  },
  {
    // 512-byte chunks (E = 32): every step of 40 entries empties one area or more and ends
    // inside another, so cuts fall between the zeroing of emptied areas and the FUA write.
    seed: 34,
    originBytes: 96 * KiB + 512,
    specs: [
      { name: 'm', kind: 'P', chunkBytes: 512, cowBytes: 1024 * KiB },
      { name: 'a', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 1024 * KiB },
    ],
    originWrites: 18,
    cutStride: 1,
    maxStepChunks: 40,
  },
  {
    // A grow-on-demand COW (a volume's own file): every committed step truncates the COW
    // chunks no entry left refers to, so cuts fall before, during and after each truncation.
    seed: 35,
    originBytes: 768 * KiB + 512,
    specs: [
      { name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 64 * KiB, growable: true },
      { name: 'a', kind: 'P', chunkBytes: 16 * KiB, cowBytes: 2048 * KiB },
    ],
    originWrites: 150,
    cutStride: 2,
    maxStepChunks: 24,
  },
]

test('merge crash: reopening at every cut point resumes the merge to the same final origin, other snapshots intact', async () => {
  let cuts = 0
  let replays = 0
  const started = performance.now()
  for (const c of CASES) {
    const trace = await recordMergeCase(c)
    // The cuts between a step's origin copies and its commitMerge must include batches of
    // several non-consecutive runs (one flush and one metadata write for all of them).
    assert.ok(trace.mostRuns > 1, `seed ${c.seed}: no step merged several runs`)
    if (c.specs.some((s) => s.growable === true)) {
      const shrinks = trace.recorder.events().filter((e) => e.kind === 'resize' && e.device === 'm' && e.sizeBytes !== undefined).length
      assert.ok(shrinks >= 3, `seed ${c.seed}: the merge truncated the COW ${shrinks} times`)
    }
    const points = mergeCuts(trace)
    for (const cut of points) {
      for (const mode of ['drop', 'random'] as const) await checkMergeCut(trace, cut, mode)
      replays += 2
    }
    cuts += points.length
    console.log(`merge crash seed ${c.seed}: ${trace.recorder.length} recorded events, ${points.length} cut points`)
  }
  console.log(`merge crash: ${cuts} cut points, ${replays} crash replays with resume in ${Math.round(performance.now() - started)} ms`)
  assert.ok(cuts > 300, `only ${cuts} cut points`)
})
