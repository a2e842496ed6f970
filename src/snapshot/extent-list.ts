/**
 * Disjoint extents of chunks, sorted, found by binary search: a snapshot's pending copies (each
 * owns its chunks from creation until it settles; qemu's block-copy asserts the same for its
 * in-flight tasks). Inserting an extent that overlaps one already present is a bug and throws.
 */
export interface Extent {
  readonly firstChunk: number
  readonly count: number
}

export class ExtentList<T extends Extent> {
  private items: T[] = []

  get size(): number {
    return this.items.length
  }

  values(): readonly T[] {
    return this.items
  }

  /** The extent holding `chunk`, or null. */
  find(chunk: number): T | null {
    const e = this.items[this.firstEndingAfter(chunk)]
    return e !== undefined && e.firstChunk <= chunk ? e : null
  }

  /** The first extent that holds `chunk` or lies after it, or null. */
  firstFrom(chunk: number): T | null {
    return this.items[this.firstEndingAfter(chunk)] ?? null
  }

  insert(item: T): void {
    const items = this.items
    const at = this.firstEndingAfter(item.firstChunk)
    const next = items[at]
    if (next !== undefined && next.firstChunk < item.firstChunk + item.count) {
      throw new Error(`extent ${item.firstChunk}+${item.count} overlaps ${next.firstChunk}+${next.count}`)
    }
    if (at === items.length) items.push(item)
    else items.splice(at, 0, item)
  }

  remove(item: T): void {
    const at = this.firstEndingAfter(item.firstChunk)
    if (this.items[at] === item) this.items.splice(at, 1)
  }

  /** Index of the first extent whose end (first + count) is > `chunk`. */
  private firstEndingAfter(chunk: number): number {
    const items = this.items
    let lo = 0
    let hi = items.length
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      const e = items[mid] as T
      if (e.firstChunk + e.count <= chunk) lo = mid + 1
      else hi = mid
    }
    return lo
  }
}
