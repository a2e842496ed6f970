/** What every suite is handed: the options, the scratch directory, the shared origin image and the results. */
import type { Args } from './args.js'

/**
 * results.json: `machine`, `args` and `totalSeconds` belong to the runner, every other key to the
 * suite that declared it (Suite.initialResults), which alone reads and writes it.
 */
export interface Results {
  machine: Record<string, unknown>
  args: Record<string, unknown>
  totalSeconds: number
  [suiteKey: string]: unknown
}

export interface BenchContext {
  readonly args: Args
  /** The raw command line, for a suite's own options. */
  readonly argv: readonly string[]
  /** Scratch directory, removed at the end of the run. */
  readonly workDir: string
  /** The origin image every server's copy starts from (args.size bytes); written only when a selected suite asks for it. */
  readonly baseImage: string
  readonly results: Results
}
