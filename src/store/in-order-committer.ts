/**
 * Parks out-of-order commit requests until every lower sequence number has been handed over,
 * then releases them in sequence order. Both stores use it so the order guarantee does not
 * depend on how copies happen to complete.
 *
 * Callback driven: a commit costs no promise of its own (commit() is the promise form).
 */
import type { PreparedException } from './exception-store.js'

/** How a prepared exception ended: its copy landed, failed (I/O), or was given up for want of space. */
export type CommitKind = 'copied' | 'failed' | 'abandoned'

/** Receives a commit's result: true when recorded (durable, for a persistent store). */
export type CommitDone = (ok: boolean) => void

interface Parked {
  readonly e: PreparedException
  readonly kind: CommitKind
  readonly done: CommitDone
}

export class InOrderCommitter {
  private nextSequence = 0 // next sequence number to hand out
  private nextToRelease = 0 // lowest sequence not yet released
  private readonly parked = new Map<number, Parked>()

  /** Records `e` and calls `done` with the result (later, or at once). */
  private readonly release: (e: PreparedException, kind: CommitKind, done: CommitDone) => void

  constructor(release: (e: PreparedException, kind: CommitKind, done: CommitDone) => void) {
    this.release = release
  }

  allocateSequence(): number {
    return this.nextSequence++
  }

  commit(e: PreparedException, kind: CommitKind): Promise<boolean> {
    // Resolved from a microtask: a release made inside this executor (in order already) must
    // not settle this promise ahead of those released just before it.
    return new Promise<boolean>((resolve) => this.commitThen(e, kind, (ok) => queueMicrotask(() => resolve(ok))))
  }

  commitThen(e: PreparedException, kind: CommitKind, done: CommitDone): void {
    if (e.sequence === this.nextToRelease && this.parked.size === 0) {
      // In order already (the common case): no parking.
      this.nextToRelease++
      this.release(e, kind, done)
      return
    }
    this.parked.set(e.sequence, { e, kind, done })
    this.drain()
  }

  private drain(): void {
    for (;;) {
      const next = this.parked.get(this.nextToRelease)
      if (!next) return
      this.parked.delete(this.nextToRelease)
      this.nextToRelease++
      this.release(next.e, next.kind, next.done)
    }
  }
}
