/**
 * What the torture campaigns share: a case id that replays one case exactly, the failure record,
 * a deadline that only detects hangs (it never decides correctness), and the crash catcher.
 */
import { SnapError } from '../src/errors.js'

export interface CampaignSettings {
  /** Cases (or cut points) to run. */
  readonly count: number
  readonly seed: number
  /** Stop starting cases once this wall-clock time (ms since epoch) has passed. */
  readonly stopAt: number
  /** Per-case hang detector, in ms. */
  readonly deadlineMs: number
  /** Called for each failure as it is found. */
  readonly onFailure: (failure: Failure) => void
}

export interface Failure {
  readonly campaign: string
  /** Replays the case: npm run torture -- --seed <seed> --replay <campaign>:<caseId> */
  readonly caseId: string
  readonly message: string
}

export interface CampaignResult {
  /** Named counts printed in the summary, e.g. { 'cut points': 10000, replays: 20000 }. */
  readonly counts: Record<string, number>
  /** The main count (what --count asked for). */
  readonly done: number
  readonly failures: number
  readonly stoppedByTime: boolean
}

export interface Campaign {
  readonly name: string
  /** What `count` counts, for the summary. */
  readonly unit: string
  run(settings: CampaignSettings): Promise<CampaignResult>
  /** Runs one case; throws on failure. */
  replay(seed: number, caseId: string, deadlineMs: number): Promise<void>
}

export class HangError extends Error {
  constructor(what: string, ms: number) {
    super(`hang: ${what} did not finish within ${ms} ms`)
    this.name = 'HangError'
  }
}

/** Rejects with a HangError when `work` has not settled after `ms` (a hang detector only). */
export async function withDeadline<T>(work: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new HangError(what, ms)), ms)
  })
  try {
    return await Promise.race([work, expired])
  } finally {
    clearTimeout(timer)
  }
}

/** The verdict text of an unexpected exception: its stack for non-SnapErrors (a crash). */
export function describe(err: unknown): string {
  if (err instanceof SnapError) return `SnapError ${err.code}: ${err.message}`
  if (err instanceof HangError) return err.message
  if (err instanceof Error) return `${err.name}: ${err.message}${err.stack ? `\n${err.stack.split('\n').slice(1, 6).join('\n')}` : ''}`
  return String(err)
}

/**
 * A refusal is clean when it is a SnapError with a code and a one-line, non-empty message
 * (what the CLI prints as `blocksnap: error: ...`).
 */
export function cleanRefusal(err: unknown): string | null {
  if (!(err instanceof SnapError)) return `not a SnapError: ${describe(err)}`
  if (typeof err.code !== 'string' || !/^[A-Z_]+$/.test(err.code)) return `SnapError without a code: ${err.message}`
  if (err.message.length === 0 || err.message.includes('\n')) return `SnapError ${err.code} message is not one line: ${JSON.stringify(err.message)}`
  return null
}

/**
 * Uncaught exceptions and unhandled rejections are crashes; they are pinned on the cases running
 * at the time (`current()`), since in-process work cannot be traced back more exactly.
 */
export function catchCrashes(report: (message: string) => void): () => void {
  const onError = (err: unknown) => report(`uncaught: ${describe(err)}`)
  process.on('uncaughtException', onError)
  process.on('unhandledRejection', onError)
  return () => {
    process.off('uncaughtException', onError)
    process.off('unhandledRejection', onError)
  }
}

/** Prints a progress line to stderr at most every `everyMs`. */
export function progress(label: string, everyMs = 10_000): (done: number, total: number) => void {
  let last = Date.now()
  const started = last
  return (done, total) => {
    const now = Date.now()
    if (now - last < everyMs) return
    last = now
    const rate = done / ((now - started) / 1000)
    process.stderr.write(`torture: ${label}: ${done}/${total} (${rate.toFixed(0)}/s)\n`)
  }
}
