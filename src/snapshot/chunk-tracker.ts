/**
 * A multiset of chunks with I/O in flight that must finish before something else may happen to
 * the chunk: snapshot reads routed to the origin (an origin overwrite must wait for them), and on
 * a merging origin, writes remapped to the COW (the merge must wait for them).
 */
/** What drain() gives for a chunk nothing is tracked on: no new promise per call. */
const IDLE: Promise<void> = Promise.resolve()

export class ChunkTracker {
  private readonly counts = new Map<number, number>()
  private readonly waiters = new Map<number, Array<() => void>>()

  add(chunk: number): void {
    this.counts.set(chunk, (this.counts.get(chunk) ?? 0) + 1)
  }

  remove(chunk: number): void {
    const n = (this.counts.get(chunk) ?? 0) - 1
    if (n > 0) {
      this.counts.set(chunk, n)
      return
    }
    this.counts.delete(chunk)
    const waiters = this.waiters.get(chunk)
    if (waiters) {
      this.waiters.delete(chunk)
      for (const wake of waiters) wake()
    }
  }

  isTracked(chunk: number): boolean {
    return this.counts.has(chunk)
  }

  /** Resolves once no I/O is tracked on `chunk` (an already settled promise when none is). */
  drain(chunk: number): Promise<void> {
    return this.counts.has(chunk) ? this.untilIdle(chunk) : IDLE
  }

  /** Resolves once no I/O is tracked on any of `count` chunks from `first`; checks the rest as it goes. */
  async drainRange(first: number, count: number): Promise<void> {
    for (let c = first; c < first + count; c++) if (this.counts.has(c)) await this.untilIdle(c)
  }

  private async untilIdle(chunk: number): Promise<void> {
    while (this.counts.has(chunk)) {
      await new Promise<void>((resolve) => {
        const list = this.waiters.get(chunk)
        if (list) list.push(resolve)
        else this.waiters.set(chunk, [resolve])
      })
    }
  }
}
