/**
 * Exclusive locks on byte ranges: a holder waits for every overlapping holder that came before
 * it. Used for read-modify-write under a server's minimum block size, where two writes to
 * different bytes of one block must not both read, patch and write it back. Few holders at a
 * time, so a list does.
 */
export class RangeLock {
  private held: { start: number; end: number; released: Promise<void> }[] = []

  /** Resolves with the release function once no earlier holder overlaps [start, end). */
  async acquire(start: number, end: number): Promise<() => void> {
    const before = this.held.filter((h) => h.start < end && start < h.end).map((h) => h.released)
    let release!: () => void
    const entry = { start, end, released: new Promise<void>((resolve) => (release = resolve)) }
    this.held.push(entry)
    await Promise.all(before)
    return () => {
      this.held = this.held.filter((h) => h !== entry)
      release()
    }
  }
}
