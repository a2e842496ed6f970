/**
 * A pending exception: one per (snapshot, extent) while the old data of a run of chunks is being
 * copied to the COW and their entries committed. The extent owns its chunks until it settles
 * (no other pending extent of the snapshot overlaps it), and every writer that needs any of them
 * saved waits on the same object, so concurrent origin writes share one copy.
 */
import type { SnapError } from '../errors.js'
import type { PreparedException } from '../store/exception-store.js'
import { type Deferred, deferred } from '../util/deferred.js'

/**
 * How a pending exception ended: true, saved (durable and in the table); false, failed (the
 * snapshot is invalid); a SNAP_NO_SPACE error, abandoned because the copy could not get space
 * (nothing recorded, the snapshot unchanged: the write that needed it must not land).
 */
export type PendingOutcome = boolean | SnapError

export class PendingException implements OriginWait {
  readonly prepared: PreparedException
  private outcomeNow: PendingOutcome | undefined = undefined
  /** Callbacks for the outcome: most extents have one waiter (the write that made them), so no array for it. */
  private listener: ((outcome: PendingOutcome) => void) | null = null
  private moreListeners: Array<(outcome: PendingOutcome) => void> | null = null
  /** Made only when someone asks for a promise. */
  private settled: Deferred<PendingOutcome> | null = null

  constructor(prepared: PreparedException) {
    this.prepared = prepared
  }

  /** First origin chunk of the extent. */
  get firstChunk(): number {
    return this.prepared.oldChunk
  }

  /** Chunks in the extent. */
  get count(): number {
    return this.prepared.count
  }

  /** COW chunk of the first chunk; the extent's COW chunks are consecutive. */
  get newChunk(): number {
    return this.prepared.newChunk
  }

  /** The outcome once settled, undefined before. */
  get outcome(): PendingOutcome | undefined {
    return this.outcomeNow
  }

  /** Resolves (never rejects) with the outcome once the extent is settled. */
  get done(): Promise<PendingOutcome> {
    if (this.outcomeNow !== undefined) return Promise.resolve(this.outcomeNow)
    this.settled ??= deferred<PendingOutcome>()
    return this.settled.promise
  }

  /**
   * Calls `fn` with the outcome once the extent is settled (the promise-free form of `done`,
   * for the origin's write path); at once if it already is.
   */
  whenSettled(fn: (outcome: PendingOutcome) => void): void {
    if (this.outcomeNow !== undefined) fn(this.outcomeNow)
    else if (this.listener === null) this.listener = fn
    else (this.moreListeners ??= []).push(fn)
  }

  settle(outcome: PendingOutcome): void {
    if (this.outcomeNow !== undefined) return
    this.outcomeNow = outcome
    const first = this.listener
    const more = this.moreListeners
    this.listener = null
    this.moreListeners = null
    if (first !== null) first(outcome)
    if (more !== null) for (const fn of more) fn(outcome)
    this.settled?.resolve(outcome)
  }
}

/**
 * What an origin write waits for before it looks again: a pending extent, or an extension of a
 * full fixed-size COW (autoextend) that the copy it needs must wait for.
 */
export interface OriginWait {
  readonly outcome: PendingOutcome | undefined
  readonly done: Promise<PendingOutcome>
  whenSettled(fn: (outcome: PendingOutcome) => void): void
}

/**
 * Waits for an extension of a full COW in flight (from the snapshot's CowFullHandler). Settles
 * true whatever the extension's outcome: nothing to refuse, the write looks again, and a failed
 * extension leaves the COW full, which that second look then meets.
 */
export class ExtensionWait implements OriginWait {
  private outcomeNow: PendingOutcome | undefined = undefined
  private listeners: Array<(outcome: PendingOutcome) => void> | null = null
  readonly done: Promise<PendingOutcome>

  /** `extension` must not reject. */
  constructor(extension: Promise<void>) {
    this.done = extension.then(() => {
      this.outcomeNow = true
      const listeners = this.listeners
      this.listeners = null
      if (listeners) for (const fn of listeners) fn(true)
      return true
    })
  }

  get outcome(): PendingOutcome | undefined {
    return this.outcomeNow
  }

  whenSettled(fn: (outcome: PendingOutcome) => void): void {
    if (this.outcomeNow !== undefined) fn(this.outcomeNow)
    else (this.listeners ??= []).push(fn)
  }
}

/**
 * Calls `fn` once every wait in `waits` is settled, with the first SNAP_NO_SPACE error among
 * their outcomes (or null); at once when `waits` is empty or all are settled.
 */
export function whenAllSettled(waits: readonly OriginWait[], fn: (noSpace: SnapError | null) => void): void {
  let left = waits.length + 1
  const one = (): void => {
    if (--left > 0) return
    let noSpace: SnapError | null = null
    for (const pe of waits) {
      const outcome = pe.outcome
      if (typeof outcome !== 'boolean' && outcome !== undefined) {
        noSpace = outcome
        break
      }
    }
    fn(noSpace)
  }
  for (const pe of waits) pe.whenSettled(one)
  one()
}
