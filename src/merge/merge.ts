/**
 * Live snapshot merge (the kernel's `snapshot-merge` target, reference §8): rolls an origin
 * back to one of its snapshots while the origin stays in use and every other snapshot of the
 * origin keeps its content.
 *
 * Design notes
 * - startMerge hands the snapshot over with origin mutations held and drained (the kernel's
 *   suspend of the origin), moves the snapshot to its merging state (snapshot.beginMerge: its own
 *   view then refuses I/O and origin writes ignore it) and installs a MergeView as the origin's
 *   interceptor through origin.installInterceptor (§8.2). Copies COW → origin go through the
 *   origin's copy engine; no module writes another's fields.
 * - The loop (§8.4) merges a batch of table entries per step, newest first: the last K entries
 *   of the table, possibly over several metadata areas, which may form several runs (entries
 *   consecutive in both origin and COW), K bounded by STEP_BYTES, the rate limit and maxStepChunks.
 *   prepareMerge → relocation in the other snapshots over every run (§8.5) → publish the
 *   window (all runs) → wait for tracked COW writes to it → copy each run COW → origin → ONE
 *   origin flush (and, beside it, the COW flush the table write follows) → ONE commitMerge(K) (durable) → remove the chunks from the in-memory table,
 *   run by run, highest first → release the held writes. commitMerge(K) leaves the same area
 *   images as K single-run steps would have, so the on-disk format is unchanged; batching only
 *   saves the per-run flush and FUA write (random 4 KiB changes are all 1-chunk runs; 4 KiB
 *   chunks put only 256 entries in an area).
 *   Steps overlap: step N + 1 is prepared (its batch ends where N's begins), relocated and
 *   copied while up to COMMITTING_STEPS steps before it flush and commit, and it commits only
 *   after they have; steps whose flushes are done together commit as one (group commit). Each step
 *   runs as an origin mutation (its commit as one more, entered before the copy's ends), so
 *   live snapshot creation (which drains mutations) never sees a half-done step.
 * - Relocation samples the global pending-exception done counter before every scan, triggers
 *   exceptions over the whole extent (each snapshot in its own chunk size) and, if anything is
 *   still pending, sleeps until the counter changes and rescans. It never waits on the
 *   individual pending exceptions: any completion anywhere wakes it and the rescan decides.
 * - Crash safety comes from the order above: the other snapshots' exceptions are durable before
 *   the origin is overwritten, the origin is flushed before the table shrinks, held writes reach
 *   the origin only after the commit. After a crash, reopening and calling startMerge resumes
 *   at the new end of the table; a step copied but not committed is simply copied again.
 * - Pause/stop take effect at step boundaries. A stopped or failed merge leaves the view
 *   installed (the origin must keep presenting the merged view); startMerge on the same
 *   snapshot resumes it. As in the kernel, Merge failed stays set after a restart (status keeps
 *   saying `Merge failed`).
 * - Rate limiting sleeps before a step until doneBytes/elapsed is back at the limit, measured
 *   from the last (re)start, resume or setRate.
 * - At the end (table empty) the interceptor is removed (all I/O goes straight to the origin)
 *   and the snapshot is detached from the origin and closed.
 */
import { EventEmitter } from 'node:events'
import { SnapError, isSnapError } from '../errors.js'
import type { Origin } from '../snapshot/origin.js'
import { type Clock, systemClock } from '../util/clock.js'
import { COPY_PIECE_BYTES, CopyFailure, type CopyRegion } from '../snapshot/copy-engine.js'
import type { Snapshot } from '../snapshot/snapshot.js'
import { type ChunkRange, MergeView, type MergeWindow, mergeFailedError } from './merge-view.js'

export { type ChunkRange, MergeView, type MergeWindow } from './merge-view.js'

/** One run of a step: origin chunks and the COW chunk of the first. */
interface StepRange extends ChunkRange {
  readonly cowChunk: number
}

/** A step whose copies are done, waiting for its flush and commit. */
interface CopiedStep {
  readonly ranges: readonly StepRange[]
  readonly count: number
  readonly window: MergeWindow
  /** Table index of the step's oldest entry: where the next step's batch ends. */
  readonly firstIndex: number
}

/** A copied step in the commit queue. */
interface CommittingStep {
  readonly step: CopiedStep
  readonly endMutation: () => void
  readonly resolve: () => void
  /** Its origin and COW flushes have settled. */
  flushed: boolean
  flushFailure: SnapError | null
}

export type MergeState = 'running' | 'paused' | 'stopped' | 'complete' | 'failed'

export interface MergeProgress {
  readonly doneChunks: number
  readonly totalChunks: number
  readonly doneBytes: number
  readonly totalBytes: number
  /** Measured since the last (re)start, resume or rate change. */
  readonly rateBytesPerSecond: number
  /** null while the rate is unknown. */
  readonly etaSeconds: number | null
}

export interface MergeStats {
  /** Steps committed. */
  steps: number
  /** Relocation scans of an extent (origin_extent_write passes). */
  relocationScans: number
  /** Times relocation slept on the global done counter. */
  relocationWaits: number
}

export interface MergeOptions {
  /** Bytes per second; absent or 0: unlimited. */
  readonly rateBytesPerSecond?: number
  /** Aborting stops the merge at the next step boundary. */
  readonly signal?: AbortSignal
  /** Caps the chunks merged per step (the rest is merged by the next steps). */
  readonly maxStepChunks?: number
  /**
   * Runs once the table is empty and the snapshot detached, before the merge reports complete,
   * so whoever waits for the end (done, 'complete') finds the owner's records already updated.
   * If it fails, the merge fails with its error (the origin is fully merged regardless).
   */
  readonly onComplete?: () => Promise<void>
  /**
   * @internal TEST ONLY: skip triggering exceptions in the other snapshots (§8.5). Other snapshots then
   * change under the merge; exists so a test can prove it guards the relocation.
   */
  readonly unsafeSkipRelocation?: boolean
  /** Time for the rate limit and the measured rate/ETA; the system clock by default. */
  readonly clock?: Clock
}

/**
 * Copy workers of one step: enough to keep about COPY_IN_FLIGHT_BYTES moving, between
 * MIN_COPY_WORKERS and MAX_COPY_WORKERS (at most that many pieces in memory). Small runs
 * (random 4 KiB changes) need many requests in flight; big ones (sequential changes, 1 MiB
 * pieces) went slower with eight than with three: their reads and writes queue ahead of the
 * flushes and commits the steps wait for, in the same four I/O threads (256 MiB of sequential
 * 4 KiB-chunk changes: loop 0.15-0.16 s with three, 0.15-0.17 s with eight at 64 MiB steps;
 * random 4 KiB changes took 1.5x as long with three or four as with eight).
 */
const COPY_IN_FLIGHT_BYTES = 3 * 1024 * 1024
const MIN_COPY_WORKERS = 3
const MAX_COPY_WORKERS = 8
/**
 * Most bytes one step merges: bounds how long writes to the step's chunks are held (and the
 * memory they hold: up to about two steps' worth). With 4 KiB chunks that is 32 metadata areas.
 * Every step costs an origin flush and a commit with two COW flushes; with 16 MiB steps the same
 * merge spent longer waiting on those than copying (loop 0.18-0.21 s vs 0.14-0.16 s with 64 MiB
 * steps, once copies stopped allocating a buffer per piece). 32 MiB measured the same as 64 MiB
 * within the noise (256 MiB of sequential 4 KiB-chunk changes: 0.27-0.31 s vs 0.28-0.32 s) at
 * half the held-write bound.
 */
const STEP_BYTES = 32 * 1024 * 1024
/**
 * Copied steps that may wait for their flushes and commit while the next step copies. The disk
 * is the bound of a fast merge; two keep a flush going while the copies run ahead (256 MiB of
 * sequential 4 KiB-chunk changes, bench median of three rounds vs qemu-img commit: 0.86 with
 * one, 0.97 with two, 0.83 with three, whose bigger flushes held up the commits behind them).
 */
export const COMMITTING_STEPS = 2
/** With a rate limit, a step merges at most this many seconds' worth of it (at least 1 chunk), so the rate stays smooth. */
const RATE_STEP_SECONDS = 0.02

export interface MergeEvents {
  progress: [MergeProgress]
  window: [MergeWindow]
  paused: []
  resumed: []
  stopped: []
  complete: []
  failed: [Error]
}

export class Merge extends EventEmitter<MergeEvents> {
  readonly origin: Origin
  readonly snapshot: Snapshot
  readonly view: MergeView
  /** Resolves when the merge completes or is stopped; rejects when it fails. */
  readonly done: Promise<void>
  readonly stats: MergeStats = { steps: 0, relocationScans: 0, relocationWaits: 0 }
  private _state: MergeState = 'running'
  private readonly skipRelocation: boolean
  private readonly onComplete: (() => Promise<void>) | undefined
  private readonly maxStepChunks: number
  private rate: number
  private readonly clock: Clock
  private readonly totalChunks: number
  private doneChunks = 0
  private rateBaseTime = 0
  private rateBaseBytes = 0
  private stopRequested = false
  private stepFailure: SnapError | null = null
  /** Copied steps waiting for their flushes or their turn to commit, oldest first. */
  private readonly commitQueue: CommittingStep[] = []
  private groupCommitting = false
  private pauseRequested = false
  private wake: (() => void) | null = null
  private resolveDone!: () => void
  private rejectDone!: (err: unknown) => void
  private readonly onAbort: () => void
  private readonly signal: AbortSignal | undefined

  constructor(origin: Origin, snapshot: Snapshot, view: MergeView, options: MergeOptions) {
    super()
    this.origin = origin
    this.snapshot = snapshot
    this.view = view
    this.skipRelocation = options.unsafeSkipRelocation === true
    this.onComplete = options.onComplete
    this.maxStepChunks = options.maxStepChunks ?? Infinity
    this.rate = checkRate(options.rateBytesPerSecond)
    this.clock = options.clock ?? systemClock
    this.totalChunks = snapshot.table.size
    this.done = new Promise<void>((resolve, reject) => {
      this.resolveDone = resolve
      this.rejectDone = reject
    })
    // Callers that only watch events must not get an unhandled rejection.
    this.done.catch(() => {})
    this.signal = options.signal
    this.onAbort = () => void this.stop()
    if (this.signal) {
      if (this.signal.aborted) this.stopRequested = true
      else this.signal.addEventListener('abort', this.onAbort, { once: true })
    }
  }

  get state(): MergeState {
    return this._state
  }

  /** Current step, if one is in progress. */
  get window(): MergeWindow | null {
    return this.view.window
  }

  get rateBytesPerSecond(): number {
    return this.rate
  }

  /** Kernel info status: `Invalid` > `Merge failed` > `Overflow` > `<allocated>/<total> <metadata>`. */
  statusText(): string {
    return this.snapshot.statusText()
  }

  progress(): MergeProgress {
    const cb = this.snapshot.chunkBytes
    const doneBytes = this.doneChunks * cb
    const totalBytes = this.totalChunks * cb
    const elapsed = (this.clock.now() - this.rateBaseTime) / 1000
    const measured = elapsed > 0 ? (doneBytes - this.rateBaseBytes) / elapsed : 0
    const remaining = totalBytes - doneBytes
    let etaSeconds: number | null = null
    if (remaining <= 0) etaSeconds = 0
    else if (measured > 0) etaSeconds = remaining / measured
    else if (this.rate > 0) etaSeconds = remaining / this.rate
    return { doneChunks: this.doneChunks, totalChunks: this.totalChunks, doneBytes, totalBytes, rateBytesPerSecond: measured, etaSeconds }
  }

  /** Pauses at the next step boundary; resolves once paused (or the merge has ended). */
  async pause(): Promise<void> {
    if (this._state !== 'running') return
    this.pauseRequested = true
    this.kick()
    await this.until(() => this._state !== 'running')
  }

  resume(): void {
    if (!this.pauseRequested) return
    this.pauseRequested = false
    this.kick()
  }

  /** Stops at the next step boundary; resolves once the loop has ended. */
  async stop(): Promise<void> {
    if (this.ended) return
    this.stopRequested = true
    this.kick()
    await this.until(() => this.ended)
  }

  /** New limit in bytes/s (0 or undefined: unlimited); measured from now on. */
  setRate(bytesPerSecond: number | undefined): void {
    this.rate = checkRate(bytesPerSecond)
    this.resetRateBase()
    this.kick()
  }

  private get ended(): boolean {
    return this._state === 'stopped' || this._state === 'complete' || this._state === 'failed'
  }

  private until(condition: () => boolean): Promise<void> {
    if (condition()) return Promise.resolve()
    return new Promise((resolve) => {
      const check = () => {
        if (!condition()) return
        for (const e of ['paused', 'stopped', 'complete', 'failed'] as const) this.off(e, check)
        resolve()
      }
      for (const e of ['paused', 'stopped', 'complete', 'failed'] as const) this.on(e, check)
    })
  }

  private kick(): void {
    const wake = this.wake
    this.wake = null
    wake?.()
  }

  /** Sleeps up to `ms` (forever if undefined), or until a control call kicks the loop. */
  private sleep(ms?: number): Promise<void> {
    return new Promise((resolve) => {
      const cancel = ms === undefined ? undefined : this.clock.setTimer(ms, () => this.kick())
      this.wake = () => {
        cancel?.()
        resolve()
      }
    })
  }

  private resetRateBase(): void {
    this.rateBaseTime = this.clock.now()
    this.rateBaseBytes = this.doneChunks * this.snapshot.chunkBytes
  }

  /** Milliseconds to wait before the next step so bytes/s stays at the limit. */
  private rateDelay(): number {
    if (this.rate <= 0) return 0
    const due = this.rateBaseTime + ((this.doneChunks * this.snapshot.chunkBytes - this.rateBaseBytes) / this.rate) * 1000
    return due - this.clock.now()
  }

  /**
   * @internal Runs the loop; called once by startMerge. Steps overlap: step N + 1 is prepared,
   * relocated and copied while the steps before it (at most COMMITTING_STEPS) flush and commit,
   * and commits only after they have (the batch of N + 1 ends where N's begins, so the table
   * shrinks from its end as before). Controls act at step boundaries: a pause, stop or rate wait
   * first lets the committing steps finish.
   */
  async run(): Promise<void> {
    this.resetRateBase()
    // Commits not yet awaited, oldest first; they settle in that order and never reject
    // (failures land in stepFailure), so the newest settles last.
    const waiting: Array<Promise<void>> = []
    let nextEnd: number | undefined // table index the next batch ends at (undefined: the end)
    // Lets the committing step finish; the next batch then ends at the table's end again.
    const settle = async (): Promise<void> => {
      await waiting.at(-1)
      waiting.length = 0
      nextEnd = undefined
      this.throwStepFailure()
    }
    try {
      for (;;) {
        const idle = this.stopRequested || this.pauseRequested || this.rateDelay() > 0.5
        if (idle && waiting.length > 0) {
          await settle()
          continue
        }
        if (this.stopRequested) return this.finish('stopped')
        if (this.pauseRequested) {
          this._state = 'paused'
          this.emit('paused')
          while (this.pauseRequested && !this.stopRequested) await this.sleep()
          if (this.stopRequested) continue
          this._state = 'running'
          this.resetRateBase()
          this.emit('resumed')
          continue
        }
        const delay = this.rateDelay()
        if (delay > 0.5) {
          await this.sleep(delay)
          continue // re-check controls; the rate may have changed
        }
        const end = nextEnd
        const copied = await this.origin.runMutation(async () => {
          const step = await this.copyStep(end)
          // Started inside the copy's mutation, and counted as one of its own, so hold() (close,
          // snapshot removal) can never slip in between the copies and their commit.
          if (step) waiting.push(this.commitStep(step, this.origin.enterMutation()))
          return step
        })
        if (copied === null) {
          await settle()
          // The steps still committing when the last one copied counted for no rate wait yet:
          // a limited merge ends no sooner than its bytes at the limit.
          if (this.rateDelay() > 0.5) continue
          // Every batch has committed: the table is empty unless something was refused.
          if ((await this.origin.runMutation(() => this.finalStep())) === 'complete') {
            await this.complete()
            return
          }
          continue
        }
        nextEnd = copied.firstIndex
        // At most COMMITTING_STEPS steps commit while the next one copies.
        while (waiting.length > COMMITTING_STEPS) await waiting.shift()
        this.throwStepFailure()
      }
    } catch (err) {
      await waiting.at(-1)
      this.fail(this.stepFailure ?? err)
    }
  }

  /** Rethrows the failure a committing step recorded. */
  private throwStepFailure(): void {
    if (this.stepFailure) throw this.stepFailure
  }

  /** The table is empty: uninstall the view. Runs as an origin mutation. */
  private async finalStep(): Promise<'complete' | 'continue'> {
    const runs = await this.prepare(1, undefined)
    if (runs.length > 0) return 'continue'
    this.origin.removeInterceptor(this.view)
    return 'complete'
  }

  private async prepare(maxEntries: number, endIndex: number | undefined) {
    const snapshot = this.snapshot
    if (!snapshot.valid) {
      // §8.4 step 2: stop without setting mergeFailed; the view behaves as a plain origin.
      throw new SnapError('SNAP_INVALID', `${snapshot.snapshotName}: snapshot is invalid: can't merge`)
    }
    try {
      return await snapshot.store.prepareMerge(maxEntries, endIndex)
    } catch (err) {
      snapshot.markMergeFailed()
      throw mergeFailedError(`${snapshot.snapshotName}: read error in exception store: shutting down merge`, err)
    }
  }

  /**
   * The first half of a step (§8.4): the batch ending at `endIndex`, relocation in the other
   * snapshots, the window, and the copies COW → origin. Null when there is nothing before
   * `endIndex`. Runs as an origin mutation.
   */
  private async copyStep(endIndex: number | undefined): Promise<CopiedStep | null> {
    const snapshot = this.snapshot
    const first = endIndex ?? snapshot.store.mergeEntries()
    const runs = await this.prepare(this.stepChunks(), endIndex)
    if (runs.length === 0) return null
    const ranges: StepRange[] = runs.map((r) => ({ firstChunk: r.lastOld + 1 - r.count, count: r.count, cowChunk: r.lastNew + 1 - r.count }))
    let count = 0
    for (const r of ranges) count += r.count

    if (!this.skipRelocation) await this.relocate(ranges)

    const window = this.view.publishWindow(ranges)
    this.emit('window', window)
    try {
      for (const r of ranges) await this.view.trackedWrites.drain(r.firstChunk, r.firstChunk + r.count)
      await this.copyRanges(ranges)
    } catch (err) {
      throw this.failStep(window, err)
    }
    return { ranges, count, window, firstIndex: first - count }
  }

  /**
   * The second half: the step's origin flush (every copy durable before any of its entries
   * leaves the table), then its turn in the group commit (commitReady). Resolves once the step
   * has committed or failed; never rejects: a failure fails the held writes, sets Merge failed
   * and is kept in stepFailure for the loop.
   * The COW flush the table write must follow (the kernel's PREFLUSH) runs beside the origin
   * flush instead of inside commitMerge after it, where it cost 0.5-20 ms a step on the path
   * every step waits for. It still ends before the table write starts, and no COW write of the
   * step comes after it: the copies only read the COW, and the entries this commit keeps were
   * durable before (a write through the view to one of them is the writer's to flush).
   */
  private commitStep(step: CopiedStep, endMutation: () => void): Promise<void> {
    const name = this.snapshot.snapshotName
    return new Promise<void>((resolve) => {
      const entry: CommittingStep = { step, endMutation, resolve, flushed: false, flushFailure: null }
      this.commitQueue.push(entry)
      const cowFlush = this.snapshot.store.cow.flush()
      const originFlush = this.origin.device.flush()
      void Promise.allSettled([originFlush, cowFlush]).then(([origin, cow]) => {
        if (origin.status === 'rejected') entry.flushFailure = mergeFailedError(`${name}: flush after merge failed: shutting down merge`, origin.reason)
        else if (cow.status === 'rejected') entry.flushFailure = mergeFailedError(`${name}: write error in exception store: shutting down merge`, cow.reason)
        entry.flushed = true
        void this.commitReady()
      })
    })
  }

  /**
   * Group commit: the steps at the head of the queue whose flushes are done go to the table in
   * ONE commitMerge (the sum of their entries; it leaves the area images the steps' own commits
   * would have), then leave the in-memory table and release their held writes, in step order.
   * A step commits only after every step before it, so the table still shrinks from its end.
   * When the disk is the bound, the flushes of the steps copied meanwhile end together, and one
   * table write (with its flush) and one space release serve them all: committed one by one,
   * each step's FUA write waited for the previous step's truncation of the COW (the kernel
   * serialises both on the inode). A failed flush fails its step and every later one; the
   * steps before it still commit.
   */
  private async commitReady(): Promise<void> {
    if (this.groupCommitting) return
    this.groupCommitting = true
    try {
      for (;;) {
        let ready = 0
        while (ready < this.commitQueue.length && (this.commitQueue[ready] as CommittingStep).flushed) ready++
        if (ready === 0) return
        const group = this.commitQueue.splice(0, ready)
        let good = 0
        if (this.stepFailure === null) while (good < group.length && (group[good] as CommittingStep).flushFailure === null) good++
        let failure: unknown = null
        if (good > 0) {
          let count = 0
          for (let i = 0; i < good; i++) count += (group[i] as CommittingStep).step.count
          try {
            await this.snapshot.store.commitMerge(count, { cowFlushed: true })
          } catch (err) {
            failure = mergeFailedError(`${this.snapshot.snapshotName}: write error in exception store: shutting down merge`, err)
            good = 0
          }
        }
        group.forEach((entry, i) => {
          try {
            if (i < good) this.stepCommitted(entry.step)
            else {
              const failed = this.failStep(entry.step.window, this.stepFailure ?? failure ?? entry.flushFailure)
              this.stepFailure ??= failed
            }
          } catch (err) {
            this.stepFailure ??= this.failStep(entry.step.window, err)
          } finally {
            entry.endMutation()
            entry.resolve()
          }
        })
      }
    } finally {
      this.groupCommitting = false
    }
  }

  /** A step's entries are durably gone from the table: the same in memory, and its held writes go. */
  private stepCommitted(step: CopiedStep): void {
    // Same order as merging the runs one step each: newest run first, highest chunk first.
    for (const r of step.ranges) this.snapshot.dropMerged(r.firstChunk, r.count)
    this.view.releaseWindow(step.window)
    this.doneChunks += step.count
    this.stats.steps++
    this.emit('progress', this.progress())
  }

  /** A step failed: Merge failed is set and its held writes fail with the returned error. */
  private failStep(window: MergeWindow, err: unknown): SnapError {
    this.snapshot.markMergeFailed()
    const failure = isSnapError(err, 'SNAP_MERGE_FAILED') ? err : mergeFailedError(`${this.snapshot.snapshotName}: merge step failed`, err)
    this.view.releaseWindow(window, failure)
    return failure
  }

  /** Most table entries the next step may merge (>= 1). */
  private stepChunks(): number {
    let bytes = STEP_BYTES
    if (this.rate > 0) bytes = Math.min(bytes, this.rate * RATE_STEP_SECONDS)
    return Math.max(1, Math.min(this.maxStepChunks, Math.floor(bytes / this.snapshot.chunkBytes)))
  }

  /**
   * §8.5: make every other snapshot hold the old data of every range, woken by the global
   * counter. Each pass triggers all ranges, so their copies run together.
   */
  private async relocate(ranges: readonly StepRange[]): Promise<void> {
    const events = this.origin.events
    const cb = this.snapshot.chunkBytes
    // A copy that could not get space fails the step (nothing is invalidated); retrying it in
    // this loop would spin for as long as the file system stays full.
    let noSpace: SnapError | null = null
    for (;;) {
      const seen = events.done
      let pending = false
      const invalidations: Array<Promise<void>> = []
      for (const r of ranges) {
        const scan = this.origin.triggerExceptions(r.firstChunk * cb, r.count * cb)
        this.stats.relocationScans++
        if (scan.waits.length > 0) pending = true
        for (const wait of scan.waits) {
          void wait.then((outcome) => {
            if (outcome instanceof SnapError) noSpace ??= outcome
          })
        }
        invalidations.push(...scan.invalidations)
      }
      // A snapshot whose COW filled up is invalidated; the merge goes on once that is durable.
      if (invalidations.length > 0) await Promise.all(invalidations)
      if (!pending) return
      this.stats.relocationWaits++
      await events.waitForChange(seen)
      if (noSpace) throw noSpace
    }
  }

  /** Copies every range COW → origin through the copy engine, copyWorkers() pieces at once. */
  private async copyRanges(ranges: readonly StepRange[]): Promise<void> {
    const cb = this.snapshot.chunkBytes
    const regions: CopyRegion[] = []
    for (const r of ranges) {
      const to = r.firstChunk * cb
      // The last origin chunk may be partial.
      const length = Math.max(0, Math.min(r.count * cb, this.origin.sizeBytes - to))
      if (length > 0) regions.push({ from: r.cowChunk * cb, to, length })
    }
    try {
      await this.origin.copies.copyRegions(this.snapshot.store.cow, this.origin.device, regions, { concurrency: copyWorkers(regions) })
    } catch (err) {
      const stage = err instanceof CopyFailure && err.stage === 'read' ? 'read' : 'write'
      throw mergeFailedError(`${this.snapshot.snapshotName}: ${stage} error: shutting down merge`, err instanceof CopyFailure ? err.cause : err)
    }
  }

  private async complete(): Promise<void> {
    // Outside the step's mutation: removeSnapshot drains origin mutations. Reads and flushes
    // that entered the view before it was uninstalled may still use the COW: wait for them.
    await this.view.drain()
    try {
      await this.origin.removeSnapshot(this.snapshot)
    } catch {
      // The merge itself is complete; a close error of the emptied COW changes nothing.
    }
    if (this.onComplete) {
      try {
        await this.onComplete()
      } catch (err) {
        this.fail(err)
        return
      }
    }
    this.view.owner = null
    this._state = 'complete'
    this.detachSignal()
    this.emit('progress', this.progress())
    this.emit('complete')
    this.resolveDone()
  }

  private finish(state: 'stopped'): void {
    this._state = state
    this.view.owner = null
    this.detachSignal()
    this.emit('stopped')
    this.resolveDone()
  }

  private fail(err: unknown): void {
    const error = err instanceof Error ? err : new Error(String(err))
    this._state = 'failed'
    this.view.owner = null
    this.detachSignal()
    this.emit('failed', error)
    this.rejectDone(error)
  }

  private detachSignal(): void {
    this.signal?.removeEventListener('abort', this.onAbort)
  }
}

/** Workers for a step's regions: about COPY_IN_FLIGHT_BYTES in flight, by their mean piece size. */
function copyWorkers(regions: readonly CopyRegion[]): number {
  let bytes = 0
  let pieces = 0
  for (const r of regions) {
    bytes += r.length
    pieces += Math.ceil(r.length / COPY_PIECE_BYTES)
  }
  const meanPieceBytes = pieces === 0 ? COPY_PIECE_BYTES : bytes / pieces
  return Math.max(MIN_COPY_WORKERS, Math.min(MAX_COPY_WORKERS, Math.floor(COPY_IN_FLIGHT_BYTES / meanPieceBytes)))
}

function checkRate(rate: number | undefined): number {
  if (rate === undefined) return 0
  if (!Number.isFinite(rate) || rate < 0) throw new SnapError('SNAP_BAD_ARGUMENT', `bad merge rate ${rate}`)
  return rate
}

function refuse(message: string): SnapError {
  return new SnapError('SNAP_MERGE_REFUSED', message)
}

/**
 * Hands `snapshot` over to a merge without merging anything: the origin presents the merged view
 * from now on (the kernel's snapshot-merge target is loaded), no chunk is copied. A volume
 * reopened with a merge pending does this; startMerge later resumes on the same view. Returns
 * the view already installed for `snapshot`, if any.
 */
export async function attachMergeView(origin: Origin, snapshot: Snapshot): Promise<MergeView> {
  if (!origin.snapshots.includes(snapshot)) {
    throw refuse(`${snapshot.snapshotName} is not a snapshot of this origin`)
  }
  if (!snapshot.store.supportsMerge) throw refuse('Snapshot exception store does not support snapshot-merge.')
  if (!snapshot.valid) throw refuse(`${snapshot.snapshotName} is invalid: can't merge`)
  const existing = origin.interceptor
  if (existing) {
    if (!(existing instanceof MergeView) || existing.snapshot !== snapshot) throw refuse('A snapshot is already merging.')
    return existing
  }
  const view = new MergeView(origin, snapshot)
  await origin.hold(async () => {
    if (origin.interceptor) throw refuse('A snapshot is already merging.')
    // Copies started by the snapshot's own writes must land before the handover.
    await snapshot.drainPending()
    snapshot.beginMerge()
    origin.installInterceptor(view)
  })
  return view
}

/**
 * Starts (or, for a snapshot whose merge was stopped, failed or interrupted by a crash,
 * resumes) merging `snapshot` into `origin`. The snapshot's own I/O must be quiesced by the
 * caller (LVM suspends the snapshot device); origin I/O may continue throughout.
 */
export async function startMerge(origin: Origin, snapshot: Snapshot, options: MergeOptions = {}): Promise<Merge> {
  const view = await attachMergeView(origin, snapshot)
  if (view.owner !== null) throw refuse('A snapshot is already merging.')
  const merge = new Merge(origin, snapshot, view, options)
  view.owner = merge
  void merge.run()
  return merge
}
