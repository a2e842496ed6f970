/**
 * Disjoint extents of chunks, sorted, found by binary search: a snapshot's pending copies (each
 * owns its chunks from creation until it settles; qemu's block-copy asserts the same for its
 * in-flight tasks). Inserting an extent that overlaps one already present is a bug and throws.
 *
 * Kept in pages of at most PAGE_EXTENTS, themselves in order: random first-touch writes keep
 * thousands of copies pending, and one sorted array moved half of them (and made a splice
 * result) on every insert and every removal. A page is split when it overflows and dropped when
 * it empties.
 */
export interface Extent {
  readonly firstChunk: number
  readonly count: number
}

const PAGE_EXTENTS = 64

export class ExtentList<T extends Extent> {
  /** Non-empty pages, each sorted, every extent of a page before every extent of the next. */
  private pages: T[][] = []
  private count = 0

  get size(): number {
    return this.count
  }

  /** Every extent, in order (a new array). */
  values(): readonly T[] {
    const all: T[] = []
    for (const page of this.pages) for (const e of page) all.push(e)
    return all
  }

  /** The extent holding `chunk`, or null. */
  find(chunk: number): T | null {
    const e = this.firstFrom(chunk)
    return e !== null && e.firstChunk <= chunk ? e : null
  }

  /** The first extent that holds `chunk` or lies after it, or null. */
  firstFrom(chunk: number): T | null {
    const p = this.pageEndingAfter(chunk)
    if (p === this.pages.length) return null
    const page = this.pages[p] as T[]
    return page[firstEndingAfter(page, chunk)] ?? null
  }

  insert(item: T): void {
    const pages = this.pages
    if (pages.length === 0) {
      pages.push([item])
      this.count++
      return
    }
    // The page holding the first extent that ends after item starts, or the last page.
    const p = Math.min(this.pageEndingAfter(item.firstChunk), pages.length - 1)
    const page = pages[p] as T[]
    const at = firstEndingAfter(page, item.firstChunk)
    const next = page[at]
    if (next !== undefined && next.firstChunk < item.firstChunk + item.count) {
      throw new Error(`extent ${item.firstChunk}+${item.count} overlaps ${next.firstChunk}+${next.count}`)
    }
    for (let i = page.length; i > at; i--) page[i] = page[i - 1] as T
    page[at] = item
    this.count++
    if (page.length > PAGE_EXTENTS) pages.splice(p + 1, 0, page.splice(PAGE_EXTENTS / 2))
  }

  remove(item: T): void {
    const p = this.pageEndingAfter(item.firstChunk)
    const page = this.pages[p]
    if (page === undefined) return
    const at = firstEndingAfter(page, item.firstChunk)
    if (page[at] !== item) return
    for (let i = at + 1; i < page.length; i++) page[i - 1] = page[i] as T
    page.pop()
    this.count--
    if (page.length === 0) this.pages.splice(p, 1)
  }

  /** Index of the first page whose last extent ends after `chunk` (pages.length: none). */
  private pageEndingAfter(chunk: number): number {
    const pages = this.pages
    let lo = 0
    let hi = pages.length
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      const page = pages[mid] as T[]
      const last = page[page.length - 1] as T
      if (last.firstChunk + last.count <= chunk) lo = mid + 1
      else hi = mid
    }
    return lo
  }
}

/** Index in `items` (sorted, disjoint) of the first extent whose end (first + count) is > `chunk`. */
export function firstEndingAfter<T extends Extent>(items: readonly T[], chunk: number): number {
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
