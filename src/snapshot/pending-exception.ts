/**
 * A pending exception: one per (snapshot, chunk) while the chunk's old data is being copied to
 * the COW and its entry committed. Every writer that needs the chunk saved waits on the same
 * object, so concurrent origin writes share one copy.
 */
import type { PreparedException } from '../store/exception-store.js'
import { type Deferred, deferred } from '../util/deferred.js'

export class PendingException {
  readonly chunk: number
  readonly prepared: PreparedException
  /** Copy (or the whole-chunk snapshot write standing in for it) has been started. */
  started = false
  private readonly settled: Deferred<boolean> = deferred<boolean>()

  constructor(chunk: number, prepared: PreparedException) {
    this.chunk = chunk
    this.prepared = prepared
  }

  get newChunk(): number {
    return this.prepared.newChunk
  }

  /** Resolves true once the exception is complete (durable and in the table), false on failure. */
  get done(): Promise<boolean> {
    return this.settled.promise
  }

  settle(success: boolean): void {
    this.settled.resolve(success)
  }
}
