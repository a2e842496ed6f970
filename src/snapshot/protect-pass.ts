/**
 * What one protect pass of the origin over a byte range found: what to wait for (pending
 * extents, COW extensions in flight), invalidations whose header write must be durable first,
 * and the copies the pass made, which the origin starts once every snapshot has been walked.
 *
 * One object per pass, with the first wait and the first copy in fields: a first-touch write
 * with one snapshot finds exactly one of each, and a pass that finds nothing (the second look
 * every write takes once its copies are committed) fills nothing. The four arrays per pass this
 * replaces, made twice per write, were the largest part of a first-touch write's garbage.
 */
import type { SnapError } from '../errors.js'
import type { CopyTarget } from './copy-engine.js'
import { type OriginWait, type PendingOutcome, whenAllSettled } from './pending-exception.js'
import type { ProtectSink } from './snapshot.js'

export class ProtectPass implements ProtectSink {
  private firstWait: OriginWait | null = null
  private moreWaits: OriginWait[] | null = null
  private invalidationList: Array<Promise<void>> | null = null
  private firstCopy: CopyTarget | null = null
  private moreCopies: CopyTarget[] | null = null

  wait(w: OriginWait): void {
    if (this.firstWait === null) this.firstWait = w
    else (this.moreWaits ??= []).push(w)
  }

  invalidation(durable: Promise<void>): void {
    ;(this.invalidationList ??= []).push(durable)
  }

  copy(target: CopyTarget): void {
    if (this.firstCopy === null) this.firstCopy = target
    else (this.moreCopies ??= []).push(target)
  }

  /** Nothing to wait for: every snapshot holds the range. */
  get clear(): boolean {
    return this.firstWait === null && this.invalidationList === null
  }

  /** The one wait, when there is exactly one (the usual case); else null. */
  get onlyWait(): OriginWait | null {
    return this.moreWaits === null ? this.firstWait : null
  }

  get hasWaits(): boolean {
    return this.firstWait !== null
  }

  /** The invalidations to wait for (null: none). */
  get invalidations(): ReadonlyArray<Promise<void>> | null {
    return this.invalidationList
  }

  /** Every wait, in the order found (a new array). */
  waits(): OriginWait[] {
    if (this.firstWait === null) return []
    const all = [this.firstWait]
    if (this.moreWaits !== null) for (const w of this.moreWaits) all.push(w)
    return all
  }

  /** The copies made, in the order made: the first one, and the rest (null: none). */
  get copyFirst(): CopyTarget | null {
    return this.firstCopy
  }

  get copyRest(): readonly CopyTarget[] | null {
    return this.moreCopies
  }

  /**
   * Calls `fn` once every wait is settled, with the first SNAP_NO_SPACE error among their
   * outcomes in the order found (or null); at once when there is nothing to wait for.
   */
  whenSettled(fn: (noSpace: SnapError | null) => void): void {
    const first = this.firstWait
    if (first === null) return fn(null)
    if (this.moreWaits === null) return whenOneSettled(first, fn)
    whenAllSettled(this.waits(), fn)
  }
}

/** whenSettled's one-wait case, a function of its own so the other cases make no closure context. */
function whenOneSettled(wait: OriginWait, fn: (noSpace: SnapError | null) => void): void {
  wait.whenSettled((outcome) => fn(noSpaceOf(outcome)))
}

function noSpaceOf(outcome: PendingOutcome): SnapError | null {
  return typeof outcome === 'boolean' ? null : outcome
}
