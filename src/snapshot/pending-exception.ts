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

export class PendingException {
  readonly prepared: PreparedException
  private readonly settled: Deferred<PendingOutcome> = deferred<PendingOutcome>()

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

  /** Resolves (never rejects) with the outcome once the extent is settled. */
  get done(): Promise<PendingOutcome> {
    return this.settled.promise
  }

  settle(outcome: PendingOutcome): void {
    this.settled.resolve(outcome)
  }
}
