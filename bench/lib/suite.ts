/**
 * A suite: one job of the bench (one kind of measurement), registered in suites/index.ts.
 * Adding a suite is one module exporting a Suite and one line in that registry.
 */
import type { BenchContext, Results } from './context.js'
import type { FioResult } from './fio.js'

/** One row of the floors table: a ratio per round, judged on their median. */
export interface FloorRow {
  what: string
  floor: string
  ok: (r: number) => boolean
  ratios: number[]
  raw: string
}

export interface Suite {
  /** Its name for `--only`. */
  readonly name: string
  /** Drives fio against the NBD peers over the shared base image (so the runner installs peers and writes the image). */
  readonly usesPeers: boolean
  /** The keys it owns in results.json, with their values before it runs (present even when it is not selected). */
  initialResults(): Record<string, unknown>
  /** Once per round, interleaved with the other per-round suites, so ratios compare figures of one round. */
  round?(ctx: BenchContext, round: number): Promise<void>
  /** Once, after every round. */
  run?(ctx: BenchContext): Promise<void>
  /** Its rows of the floors table, in order. */
  floors?(results: Results): FloorRow[]
  /** Its fio jobs, counted in the Noise section. */
  fioJobs?(results: Results): FioResult[]
  /** Its section of BENCHMARKS.md (after Noise), as lines; nothing when it has nothing to show. */
  section?(results: Results): string[]
}
