/**
 * A set of byte ranges [start, end), kept sorted, non-overlapping and with touching neighbours
 * merged, in two parallel arrays so a lookup is a binary search and no object per range is kept.
 */
export class RangeList {
  private starts: number[] = []
  private ends: number[] = []

  /** Number of disjoint ranges held. */
  get count(): number {
    return this.starts.length
  }

  /** Total bytes covered. */
  get bytes(): number {
    let sum = 0
    for (let i = 0; i < this.starts.length; i++) sum += this.ends[i]! - this.starts[i]!
    return sum
  }

  /** Index of the first range ending after `pos` (count when none does). */
  private firstEndingAfter(pos: number): number {
    let lo = 0
    let hi = this.ends.length
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if (this.ends[mid]! > pos) hi = mid
      else lo = mid + 1
    }
    return lo
  }

  add(start: number, end: number): void {
    if (end <= start) return
    // Ranges touching [start, end) on either side are absorbed: first one ending at or after start.
    const i = this.firstEndingAfter(start - 1)
    let j = i
    let newStart = start
    let newEnd = end
    while (j < this.starts.length && this.starts[j]! <= end) {
      newStart = Math.min(newStart, this.starts[j]!)
      newEnd = Math.max(newEnd, this.ends[j]!)
      j++
    }
    this.starts.splice(i, j - i, newStart)
    this.ends.splice(i, j - i, newEnd)
  }

  /** Whether [start, end) lies wholly inside one range. */
  covers(start: number, end: number): boolean {
    const i = this.firstEndingAfter(start)
    return i < this.starts.length && this.starts[i]! <= start && this.ends[i]! >= end
  }

  /** The parts of the held ranges inside [start, end), in order. */
  within(start: number, end: number): Array<[number, number]> {
    const out: Array<[number, number]> = []
    for (let i = this.firstEndingAfter(start); i < this.starts.length && this.starts[i]! < end; i++) {
      out.push([Math.max(start, this.starts[i]!), Math.min(end, this.ends[i]!)])
    }
    return out
  }
}

/**
 * Sorted, merged union of several lists of ranges, clipped to [start, end): the bytes any of
 * them covers.
 */
export function unionRanges(lists: ReadonlyArray<ReadonlyArray<readonly [number, number]>>, start: number, end: number): Array<[number, number]> {
  const all: Array<[number, number]> = []
  for (const list of lists) {
    for (const [s, e] of list) {
      const cs = Math.max(s, start)
      const ce = Math.min(e, end)
      if (ce > cs) all.push([cs, ce])
    }
  }
  all.sort((a, b) => a[0] - b[0])
  const out: Array<[number, number]> = []
  for (const r of all) {
    const last = out[out.length - 1]
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1])
    else out.push(r)
  }
  return out
}
