/**
 * Grow-on-demand COW devices: allocation happens synchronously, so the device is extended in
 * the background, in steps (at least 1 MiB or an eighth of the current size) so that a stream of
 * allocations costs few resizes. Resizes are chained; `ready` settles once every growth asked
 * for so far has been tried.
 *
 * A step can fail for want of space (the file system is full). The failure is not sticky: the
 * next request tries again, so allocations succeed once space returns. Callers ask
 * `covers(bytes)` whether the space they need is really there, rather than trusting `ready`,
 * which also reports failures of steps they do not depend on.
 *
 * `prepare` (optional) runs after each resize, for the range [from, to) the step newly covers;
 * a persistent store writes its future metadata areas there, so that the file system allocates
 * their blocks now, while a failure can still be answered by failing the copy that needed them.
 */
import type { BlockDevice } from '../device/block-device.js'
import { type SnapError, asSnapError, badArgument, noSpace } from '../errors.js'

export type GrowthPrepare = (fromBytes: number, toBytes: number) => Promise<void>

/** Whether the bytes waited for are covered, and the last step's failure if it failed. */
export type CoveredDone = (covered: boolean, err: unknown) => void

/**
 * Calls `done` with null once growth covers `neededBytes`, or with why it could not (a store's
 * whenSpaceReadyThen past its fast path: a function of its own, so that path makes no closure
 * context).
 */
export function whenSpaceCovered(growth: CowGrowth, neededBytes: number, done: (err: unknown) => void): void {
  growth.whenCovers(neededBytes, (covered, err) => done(spaceOutcome(covered, err, neededBytes)))
}

/** A store's whenSpaceReady outcome once growth has run: null, or why the space is not there. */
export function spaceOutcome(covered: boolean, err: unknown, neededBytes: number): SnapError | null {
  if (covered) return null
  if (err !== null) return asSnapError(err, `growing the COW device to ${neededBytes} bytes`)
  return noSpace(`COW device could not grow to ${neededBytes} bytes`)
}

export class CowGrowth {
  private readonly cow: BlockDevice
  private readonly alignBytes: () => number
  private readonly prepare: GrowthPrepare | null
  private targetBytes = 0 // highest size asked for (lowered again when a step fails)
  private coveredBytes: number // [0, coveredBytes) is sized and prepared
  private pending: Promise<void> = Promise.resolve()
  private lastFailed = false
  private lastError: unknown = null
  /** Waiters of the last step asked for (null when it has run). */
  private stepWaiters: Array<{ readonly bytes: number; readonly done: CoveredDone }> | null = null

  /**
   * `alignBytes` is read at each request: a persistent store may adopt its header's chunk size.
   * `coveredBytes`: how much of the device needs no preparing (default: all of it).
   */
  constructor(cow: BlockDevice, alignBytes: () => number, options: { prepare?: GrowthPrepare; coveredBytes?: number } = {}) {
    this.cow = cow
    this.alignBytes = alignBytes
    this.prepare = options.prepare ?? null
    this.coveredBytes = options.coveredBytes ?? cow.sizeBytes
  }

  /** Where preparing starts from now on (a persistent store sets it once its table is read). */
  setCovered(bytes: number): void {
    this.coveredBytes = bytes
    this.targetBytes = Math.min(this.targetBytes, bytes)
  }

  /**
   * Makes sure the device will be at least `minBytes` long (and prepared that far). The next
   * step is asked for half a step early, so a steady stream of allocations finds its space
   * ready instead of waiting for each step (unless the last step failed: then only a request
   * that really needs more space tries again).
   */
  request(minBytes: number): void {
    const step = Math.max(1024 * 1024, Math.floor(Math.max(this.cow.sizeBytes, this.targetBytes) / 8))
    const early = this.lastFailed ? 0 : step / 2
    if (minBytes + early <= this.targetBytes || minBytes + early <= this.coveredBytes) return
    this.startStep(minBytes, step)
  }

  /**
   * request() past its check, in a method of its own: the closures here made a context on every
   * call of request() (twice per copy), not only on the few that start a step.
   */
  private startStep(minBytes: number, step: number): void {
    const align = this.alignBytes()
    const target = Math.ceil((Math.max(minBytes, this.targetBytes) + step) / align) * align
    this.targetBytes = target
    const run = this.pending.catch(() => {}).then(async () => {
      if (this.coveredBytes >= target) return
      if (this.cow.sizeBytes < target) await this.cow.resize(target)
      if (this.prepare) await this.prepare(this.coveredBytes, target)
      this.coveredBytes = target
    })
    const waiters: Array<{ readonly bytes: number; readonly done: CoveredDone }> = []
    const settled = (err: unknown): void => {
      this.lastFailed = err !== null
      this.lastError = err
      if (this.stepWaiters === waiters) this.stepWaiters = null
      for (const w of waiters) w.done(this.covers(w.bytes), err)
    }
    run.then(
      () => settled(null),
      // A failed step is tried again by the next request that needs it.
      (err: unknown) => {
        this.targetBytes = Math.min(this.targetBytes, this.coveredBytes)
        settled(err)
      },
    )
    this.pending = run
    this.stepWaiters = waiters
  }

  /**
   * Calls `done(true, null)` once [0, bytes) is covered (at once if it is), else `done(false,
   * err)` once every step asked for so far has run: `ready` and `covers` without a promise.
   * `err` is the last step's failure, null if it did not fail.
   */
  whenCovers(bytes: number, done: CoveredDone): void {
    if (this.covers(bytes)) done(true, null)
    else if (this.stepWaiters !== null) this.stepWaiters.push({ bytes, done })
    else done(false, this.lastError)
  }

  /** Whether [0, bytes) is sized and prepared. */
  covers(bytes: number): boolean {
    return bytes <= this.coveredBytes
  }

  /** Settles once every step asked for so far has run; rejects when the last one failed. */
  get ready(): Promise<void> {
    return this.pending
  }
}

/**
 * Extends a fixed-size COW device (autoextend): a plain resize, since a fixed store hands out
 * chunks up to the device's size at each allocation. The area beyond the old end reads as
 * zeros, which is what a metadata area the table has not reached must hold.
 */
export async function growFixedCow(cow: BlockDevice, growable: boolean, sizeBytes: number, chunkBytes: number): Promise<void> {
  if (growable) throw badArgument('a grow-on-demand COW is not extended explicitly')
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= cow.sizeBytes || sizeBytes % chunkBytes !== 0) {
    throw badArgument(`cannot extend a ${cow.sizeBytes}-byte COW to ${sizeBytes} bytes (larger, a multiple of ${chunkBytes})`)
  }
  await cow.resize(sizeBytes)
}
