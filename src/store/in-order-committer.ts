/**
 * Parks out-of-order commit requests until every lower sequence number has been handed over,
 * then releases them in sequence order. Both stores use it so the order guarantee does not
 * depend on how copies happen to complete.
 */
import type { PreparedException } from './exception-store.js'

interface Parked {
  readonly e: PreparedException
  readonly ok: boolean
  readonly settle: (result: Promise<boolean>) => void
}

export class InOrderCommitter {
  private nextSequence = 0 // next sequence number to hand out
  private nextToRelease = 0 // lowest sequence not yet released
  private readonly parked = new Map<number, Parked>()

  private readonly release: (e: PreparedException, ok: boolean) => Promise<boolean>

  constructor(release: (e: PreparedException, ok: boolean) => Promise<boolean>) {
    this.release = release
  }

  allocateSequence(): number {
    return this.nextSequence++
  }

  commit(e: PreparedException, ok: boolean): Promise<boolean> {
    return new Promise<boolean>((resolve) => {
      this.parked.set(e.sequence, { e, ok, settle: (result) => resolve(result) })
      this.drain()
    })
  }

  private drain(): void {
    for (;;) {
      const next = this.parked.get(this.nextToRelease)
      if (!next) return
      this.parked.delete(this.nextToRelease)
      this.nextToRelease++
      next.settle(this.release(next.e, next.ok))
    }
  }
}
