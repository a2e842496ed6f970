/**
 * A pending exception: one per (snapshot, chunk) while the chunk's old data is being copied to
 * the COW and its entry committed. Every writer that needs the chunk saved waits on the same
 * object, so concurrent origin writes share one copy.
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

export class PendingException {
  readonly chunk: number
  readonly prepared: PreparedException
  /** Copy (or the whole-chunk snapshot write standing in for it) has been started. */
  started = false
  private readonly settled: Deferred<PendingOutcome> = deferred<PendingOutcome>()

  constructor(chunk: number, prepared: PreparedException) {
    this.chunk = chunk
    this.prepared = prepared
  }

  get newChunk(): number {
    return this.prepared.newChunk
  }

  /** Resolves (never rejects) with the outcome once the exception is settled. */
  get done(): Promise<PendingOutcome> {
    return this.settled.promise
  }

  settle(outcome: PendingOutcome): void {
    this.settled.resolve(outcome)
  }
}
