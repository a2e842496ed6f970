/**
 * Parks out-of-order commit requests until every lower sequence number has been handed over,
 * then releases them in sequence order. Both stores use it so the order guarantee does not
 * depend on how copies happen to complete.
 */
import type { PreparedException } from './exception-store.js'

/** How a prepared exception ended: its copy landed, failed (I/O), or was given up for want of space. */
export type CommitKind = 'copied' | 'failed' | 'abandoned'

interface Parked {
  readonly e: PreparedException
  readonly kind: CommitKind
  readonly settle: (result: Promise<boolean>) => void
}

export class InOrderCommitter {
  private nextSequence = 0 // next sequence number to hand out
  private nextToRelease = 0 // lowest sequence not yet released
  private readonly parked = new Map<number, Parked>()

  private readonly release: (e: PreparedException, kind: CommitKind) => Promise<boolean>

  constructor(release: (e: PreparedException, kind: CommitKind) => Promise<boolean>) {
    this.release = release
  }

  allocateSequence(): number {
    return this.nextSequence++
  }

  commit(e: PreparedException, kind: CommitKind): Promise<boolean> {
    return new Promise<boolean>((resolve) => {
      this.parked.set(e.sequence, { e, kind, settle: (result) => resolve(result) })
      this.drain()
    })
  }

  private drain(): void {
    for (;;) {
      const next = this.parked.get(this.nextToRelease)
      if (!next) return
      this.parked.delete(this.nextToRelease)
      this.nextToRelease++
      next.settle(this.release(next.e, next.kind))
    }
  }
}
