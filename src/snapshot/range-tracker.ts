/**
 * Ranges with I/O in flight that must finish before something else may happen to them: snapshot
 * reads routed to the origin (a copy-out must wait for them before its origin write proceeds),
 * and on a merging origin, writes remapped to the COW (the merge step must wait for them).
 * One entry per request, whatever its length: dm-thin's range cells, qemu's reqlist.
 *
 * Entries may overlap (two reads of the same bytes). They are kept sorted by start; an overlap
 * query searches for the first entry that can reach the range (start > s - longest span) and
 * scans only the entries starting before its end. The longest span is the longest since the
 * tracker was last empty, so it only ever widens the search, never misses an entry.
 */

/** One tracked request; pass it back to remove(). */
export class TrackedRange {
  readonly start: number
  readonly end: number
  /** Wake-ups of drain() calls waiting on this entry (created only when someone waits). */
  waiters: Array<() => void> | null = null

  constructor(start: number, end: number) {
    this.start = start
    this.end = end
  }
}

/** What drain() gives when nothing overlaps: no new promise per call. */
const IDLE: Promise<void> = Promise.resolve()

export class RangeTracker {
  private entries: TrackedRange[] = []
  private longest = 0

  get size(): number {
    return this.entries.length
  }

  /** Tracks [start, end) until remove() is called with the returned entry. */
  add(start: number, end: number): TrackedRange {
    const entry = new TrackedRange(start, end)
    const entries = this.entries
    if (end - start > this.longest) this.longest = end - start
    // Upper bound: after every entry with the same start, so removal finds it by identity.
    let lo = 0
    let hi = entries.length
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if ((entries[mid] as TrackedRange).start <= start) lo = mid + 1
      else hi = mid
    }
    if (lo === entries.length) entries.push(entry)
    else entries.splice(lo, 0, entry)
    return entry
  }

  remove(entry: TrackedRange): void {
    const entries = this.entries
    let at = this.lowerBound(entry.start)
    while (at < entries.length && entries[at] !== entry) at++
    if (at === entries.length) return
    entries.splice(at, 1)
    if (entries.length === 0) this.longest = 0
    const waiters = entry.waiters
    if (waiters) {
      entry.waiters = null
      for (const wake of waiters) wake()
    }
  }

  /** The first entry (by start) overlapping [start, end), or null. */
  firstOverlap(start: number, end: number): TrackedRange | null {
    const entries = this.entries
    if (entries.length === 0 || end <= start) return null
    for (let at = this.lowerBound(start - this.longest + 1); at < entries.length; at++) {
      const e = entries[at] as TrackedRange
      if (e.start >= end) return null
      if (e.end > start) return e
    }
    return null
  }

  overlaps(start: number, end: number): boolean {
    return this.firstOverlap(start, end) !== null
  }

  /**
   * Resolves once nothing overlapping [start, end) is tracked (an already settled promise when
   * nothing is). Waits on one entry at a time and searches again after each: entries added
   * meanwhile are waited for too, as a per-chunk count would.
   */
  drain(start: number, end: number): Promise<void> {
    return this.firstOverlap(start, end) ? this.untilIdle(start, end) : IDLE
  }

  private async untilIdle(start: number, end: number): Promise<void> {
    for (let e = this.firstOverlap(start, end); e; e = this.firstOverlap(start, end)) {
      const entry = e
      await new Promise<void>((resolve) => (entry.waiters ??= []).push(resolve))
    }
  }

  /** Index of the first entry whose start is >= `start`. */
  private lowerBound(start: number): number {
    const entries = this.entries
    let lo = 0
    let hi = entries.length
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if ((entries[mid] as TrackedRange).start < start) lo = mid + 1
      else hi = mid
    }
    return lo
  }
}
