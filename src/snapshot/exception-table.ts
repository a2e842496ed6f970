/**
 * The in-memory table of COMPLETE exceptions of one snapshot (origin chunk -> COW chunk), with
 * the kernel's consecutive-run compression (dm-snapshot behaviour reference §5).
 *
 * Why not a Map: a Map holds at most 2^24 entries and costs ~50-80 bytes per entry, while a
 * snapshot of a large device can hold 10^8 exceptions. This table is an open-addressing hash on
 * three parallel typed arrays (12 bytes per slot), so memory stays <= 24 bytes per exception
 * even when nothing compresses, and sequential copy-outs compress up to 256 chunks per slot.
 *
 * Layout decisions:
 * - The hash key is the GROUP `floor(old / 256)`, exactly like the kernel's `old >> 8` bucket,
 *   so every run of a group sits in the probe cluster of that group and an insert can find the
 *   run it extends. Runs never cross a group, so offset and count both fit in 8 bits.
 * - Linear probing with backward-shift deletion: no tombstones, so merge (which deletes a lot)
 *   never degrades lookups. Invariant: every run at slot p is reachable from its home slot
 *   without passing an empty slot.
 * - Capacity is not a power of two (home = hash % capacity) so the table can grow by 1.5x:
 *   growing at load 0.8 leaves load 0.53 right after, i.e. 12 / 0.53 = 22.5 bytes per run.
 * - Numbers above 2^32 are split with multiplication/division: JS shifts are 32-bit.
 */
import { SnapError } from '../errors.js'
import { radixSortWithIndex } from '../util/radix-sort.js'

/** Origin chunk numbers must be below this (group < 2^36 fits 4 bits of groupHi). */
export const MAX_ORIGIN_CHUNK = 2 ** 44
/** COW chunk numbers must be below this (newHi fits 8 bits). */
export const MAX_COW_CHUNK = 2 ** 40

/** Chunks per group: the kernel buckets complete exceptions by `old >> 8`. */
const GROUP = 256
const TWO32 = 4294967296

// meta word (Int32Array so hot loops stay int32): bit 31 = occupied (so an empty slot is 0),
// bits 24..30 = group / 2^32, bits 16..23 = new / 2^32, bits 8..15 = old % 256, bits 0..7 = count.
const OCCUPIED = -0x80000000

const INITIAL_CAPACITY = 64
const MAX_LOAD = 0.8
const GROWTH = 1.5
// home = (hash >>> 1) % capacity keeps the modulo in int32; 2^31 slots is ~1.7e9 runs.
const MAX_CAPACITY = 0x7fffffff

export interface ExceptionRun {
  /** First origin chunk of the run. */
  readonly old: number
  /** COW chunk of `old`; origin chunk old+k maps to new+k. */
  readonly new: number
  /** Number of chunks after the first, 0..255. */
  readonly count: number
}

function hashGroup(gLo: number, gHi: number): number {
  // murmur3-style finaliser over both halves: sequential groups must not share clusters
  let h = Math.imul(gLo ^ Math.imul(gHi, 0x9e3779b1), 0x85ebca6b)
  h ^= h >>> 13
  h = Math.imul(h, 0xc2b2ae35)
  h ^= h >>> 16
  return h >>> 1
}

function checkOld(old: number): void {
  if (!Number.isInteger(old) || old < 0 || old >= MAX_ORIGIN_CHUNK) {
    throw new SnapError('SNAP_OUT_OF_RANGE', `origin chunk ${old} is not an integer in [0, 2^44)`, { details: { chunk: old } })
  }
}

function checkNew(chunk: number): void {
  if (!Number.isInteger(chunk) || chunk < 0 || chunk >= MAX_COW_CHUNK) {
    throw new SnapError('SNAP_OUT_OF_RANGE', `COW chunk ${chunk} is not an integer in [0, 2^40)`, { details: { chunk } })
  }
}

export class ExceptionTable {
  private capacity = INITIAL_CAPACITY
  private growAt = Math.floor(INITIAL_CAPACITY * MAX_LOAD)
  // low 32 bits of the group, stored as int32
  private keyLo = new Int32Array(INITIAL_CAPACITY)
  // low 32 bits of the run's first COW chunk, stored as int32
  private newLo = new Int32Array(INITIAL_CAPACITY)
  private meta = new Int32Array(INITIAL_CAPACITY)
  private runsUsed = 0
  private chunks = 0

  /** Number of chunks mapped (sum of count+1 over all runs). */
  get size(): number {
    return this.chunks
  }

  /** Number of runs (table entries) in use. */
  get runCount(): number {
    return this.runsUsed
  }

  /** Bytes held by the typed arrays backing the table. */
  memoryBytes(): number {
    return this.keyLo.byteLength + this.newLo.byteLength + this.meta.byteLength
  }

  clear(): void {
    this.capacity = INITIAL_CAPACITY
    this.growAt = Math.floor(INITIAL_CAPACITY * MAX_LOAD)
    this.keyLo = new Int32Array(INITIAL_CAPACITY)
    this.newLo = new Int32Array(INITIAL_CAPACITY)
    this.meta = new Int32Array(INITIAL_CAPACITY)
    this.runsUsed = 0
    this.chunks = 0
  }

  /**
   * Adds the exception old -> cow, extending a run of the same group at its end or, failing
   * that, at its front (kernel order: its sorted walk meets the lower run first, so a chunk
   * filling a gap extends the lower run). Runs are never coalesced.
   */
  insert(old: number, cow: number): void {
    checkOld(old)
    checkNew(cow)
    const group = Math.floor(old / GROUP)
    const off = old - group * GROUP
    const gHi = Math.floor(group / TWO32)
    const gLo = (group - gHi * TWO32) | 0
    const tag = OCCUPIED | (gHi << 24)
    const keyLo = this.keyLo
    const newLo = this.newLo
    const meta = this.meta
    const cap = this.capacity
    let endSlot = -1
    let frontSlot = -1
    // Scan the whole cluster even after finding a candidate: a chunk already mapped must be
    // reported, and the scan ends on the empty slot a new run would take anyway.
    let i = hashGroup(gLo, gHi) % cap
    for (let m = meta[i]!; m !== 0; m = meta[i]!) {
      if ((m & 0xff000000) === tag && keyLo[i] === gLo) {
        const eOff = (m >>> 8) & 0xff
        const eCount = m & 0xff
        if (off >= eOff && off <= eOff + eCount) {
          throw new Error(`exception table: origin chunk ${old} is already mapped`)
        }
        const eNew = ((m >>> 16) & 0xff) * TWO32 + (newLo[i]! >>> 0)
        if (off === eOff + eCount + 1 && cow === eNew + eCount + 1) endSlot = i
        else if (off === eOff - 1 && cow === eNew - 1) frontSlot = i
      }
      if (++i === cap) i = 0
    }
    this.chunks++
    if (endSlot >= 0) {
      // the run stays inside the group because off <= 255, so count + 1 <= 255
      meta[endSlot] = meta[endSlot]! + 1
      return
    }
    if (frontSlot >= 0) {
      const m = meta[frontSlot]!
      const eNew = ((m >>> 16) & 0xff) * TWO32 + (newLo[frontSlot]! >>> 0) - 1
      const nHi = Math.floor(eNew / TWO32)
      newLo[frontSlot] = (eNew - nHi * TWO32) | 0
      meta[frontSlot] = (m & 0xff000000) | (nHi << 16) | (off << 8) | ((m & 0xff) + 1)
      return
    }
    const nHi = Math.floor(cow / TWO32)
    keyLo[i] = gLo
    newLo[i] = (cow - nHi * TWO32) | 0
    meta[i] = tag | (nHi << 16) | (off << 8)
    if (++this.runsUsed > this.growAt) this.grow()
  }

  /**
   * Loads an empty table with entries given in table order (oldChunks[i] -> newChunks[i]),
   * leaving exactly what insert() of each entry in that order would: the same chunks, the same
   * runs, the same capacity. Only slot positions differ, which nothing observes but runs() order.
   * About 10x faster than inserting random chunks into crowded groups one by one: the entries are
   * sorted by origin chunk and every group's runs are placed in one go.
   *
   * Returns false, with the table untouched, when the one-by-one path must decide instead: the
   * table is not empty, an origin chunk appears twice (insert's error names the second
   * occurrence in table order), or the capacity limit would be hit. Chunks are 32-bit here; a
   * caller with larger chunk numbers uses insert(). `oldChunks` is overwritten (sort scratch).
   */
  bulkLoad(oldChunks: Uint32Array, newChunks: Uint32Array, count: number): boolean {
    if (this.runsUsed !== 0 || this.chunks !== 0) return false
    if (count === 0) return true
    // Tables this store or the kernel wrote hand out COW chunks in table order, so the COW chunk
    // order is the table order: then the COW chunks travel through the sort and stand in for
    // the positions (sequential moves instead of a random gather per entry afterwards).
    let byNew = true
    for (let i = 1; i < count; i++) {
      if (newChunks[i]! <= newChunks[i - 1]!) {
        byNew = false
        break
      }
    }
    // order[i]: something ordered like the table position of sorted entry i
    const { keys, index: order } = radixSortWithIndex(oldChunks, count, byNew ? newChunks : null)
    const newOf = (i: number): number => (byNew ? order[i]! : newChunks[order[i]!]!)
    // Run boundaries. One by one, chunk x joins the run of x-1 when x-1 (same group, COW chunk
    // one lower) was inserted before it, else the run of x+1 when that one was; never both. So
    // linked neighbours a = x-1 and b = x share a run unless b came first AND a, when it came,
    // extended the end of x-2's run instead (x-2 linked to a and inserted before a).
    const starts = new Uint8Array(count)
    let runs = 0
    let prevLinked = false
    for (let i = 0; i < count; i++) {
      const old = keys[i]!
      let linked = false
      if (i > 0) {
        const prev = keys[i - 1]!
        if (old === prev) return false
        linked = old === prev + 1 && (old & 0xff) !== 0 && newOf(i) === newOf(i - 1) + 1
      }
      const ta = i > 0 ? order[i - 1]! : 0
      if (!linked || (order[i]! < ta && prevLinked && order[i - 2]! < ta)) {
        starts[i] = 1
        runs++
      }
      prevLinked = linked
    }
    // The capacity one-by-one growth would have reached for this many runs.
    let cap = INITIAL_CAPACITY
    let growAt = Math.floor(cap * MAX_LOAD)
    while (runs > growAt) {
      cap = Math.ceil(cap * GROWTH)
      if (cap > MAX_CAPACITY) return false
      growAt = Math.floor(cap * MAX_LOAD)
    }
    const keyLo = new Int32Array(cap)
    const newLo = new Int32Array(cap)
    const meta = new Int32Array(cap)
    let slot = -1
    let curGroup = -1
    for (let i = 0; i < count; i++) {
      if (starts[i] === 0) {
        meta[slot] = meta[slot]! + 1
        continue
      }
      const old = keys[i]!
      const group = old >>> 8
      let s: number
      if (group === curGroup) {
        // every slot from the group's home up to its previous run is taken (nothing is deleted
        // during a load), so probing on from there is what probing from home would find
        s = slot + 1 === cap ? 0 : slot + 1
      } else {
        s = hashGroup(group, 0) % cap
        curGroup = group
      }
      while (meta[s] !== 0) if (++s === cap) s = 0
      keyLo[s] = group
      newLo[s] = newOf(i) | 0
      meta[s] = OCCUPIED | ((old & 0xff) << 8)
      slot = s
    }
    this.keyLo = keyLo
    this.newLo = newLo
    this.meta = meta
    this.capacity = cap
    this.growAt = growAt
    this.runsUsed = runs
    this.chunks = count
    return true
  }

  /** COW chunk of origin chunk `old`, or -1 when it has no complete exception. */
  lookup(old: number): number {
    const i = this.findSlot(old)
    if (i < 0) return -1
    const m = this.meta[i]!
    const first = Math.floor(old / GROUP) * GROUP + ((m >>> 8) & 0xff)
    return ((m >>> 16) & 0xff) * TWO32 + (this.newLo[i]! >>> 0) + (old - first)
  }

  has(old: number): boolean {
    return this.findSlot(old) >= 0
  }

  /** The run containing `old`, so a caller can remap a range of consecutive chunks at once. */
  lookupRun(old: number): ExceptionRun | null {
    const i = this.findSlot(old)
    return i < 0 ? null : this.runAt(i, Math.floor(old / GROUP))
  }

  /**
   * Removes one chunk (merge). Only the ends of a run can go: merge removes a batch from its
   * highest chunk down, the reverse of insertion, so a middle hit means the tables disagree.
   */
  remove(old: number): void {
    checkOld(old)
    const i = this.findSlot(old)
    if (i < 0) {
      throw new SnapError('SNAP_CORRUPT_METADATA', `exception for chunk ${old} is not in memory`, { details: { chunk: old } })
    }
    const meta = this.meta
    const m = meta[i]!
    const eOff = (m >>> 8) & 0xff
    const eCount = m & 0xff
    const off = old % GROUP
    if (eCount === 0) {
      this.deleteSlot(i)
      this.runsUsed--
    } else if (off === eOff) {
      const eNew = ((m >>> 16) & 0xff) * TWO32 + (this.newLo[i]! >>> 0) + 1
      const nHi = Math.floor(eNew / TWO32)
      this.newLo[i] = (eNew - nHi * TWO32) | 0
      meta[i] = (m & 0xff000000) | (nHi << 16) | ((eOff + 1) << 8) | (eCount - 1)
    } else if (off === eOff + eCount) {
      meta[i] = m - 1
    } else {
      const first = old - off + eOff
      throw new SnapError(
        'SNAP_CORRUPT_METADATA',
        `attempt to merge chunk ${old} from the middle of a run [${first} - ${first + eCount}]`,
        { details: { chunk: old } },
      )
    }
    this.chunks--
  }

  /**
   * Adds old+k -> cow+k for k < count: what inserting the chunks one by one in ascending order
   * leaves (the same runs), with one cluster scan per group instead of one per chunk. A chunk
   * already mapped is refused as insert() refuses it (chunks of earlier groups stay inserted).
   */
  insertRun(old: number, cow: number, count: number): void {
    checkOld(old)
    checkNew(cow)
    if (count > 1) {
      checkOld(old + count - 1)
      checkNew(cow + count - 1)
    }
    for (let done = 0; done < count; ) {
      const o = old + done
      const group = Math.floor(o / GROUP)
      const seg = Math.min(count - done, (group + 1) * GROUP - o)
      // The rest of the segment must be free before the first chunk goes in: that also rules
      // out the first chunk extending the front of a run (its neighbour would be mapped).
      if (seg > 1) this.checkFree(o + 1, seg - 1)
      this.insert(o, cow + done)
      if (seg > 1) {
        // o is now the last chunk of its run, and the run ends inside the group: grow it.
        const i = this.findSlot(o)
        this.meta[i] = this.meta[i]! + (seg - 1)
        this.chunks += seg - 1
      }
      done += seg
    }
  }

  /** Throws if any of `count` chunks from `old` (all in one group) is mapped. */
  private checkFree(old: number, count: number): void {
    const group = Math.floor(old / GROUP)
    const off = old - group * GROUP
    const gHi = Math.floor(group / TWO32)
    const gLo = (group - gHi * TWO32) | 0
    const tag = OCCUPIED | (gHi << 24)
    const meta = this.meta
    const cap = this.capacity
    let i = hashGroup(gLo, gHi) % cap
    for (let m = meta[i]!; m !== 0; m = meta[i]!) {
      if ((m & 0xff000000) === tag && this.keyLo[i] === gLo) {
        const eOff = (m >>> 8) & 0xff
        const eEnd = eOff + (m & 0xff)
        if (eOff < off + count && eEnd >= off) {
          throw new Error(`exception table: origin chunk ${group * GROUP + Math.max(eOff, off)} is already mapped`)
        }
      }
      if (++i === cap) i = 0
    }
  }

  /**
   * Removes the `count` chunks from `old`, highest first, as remove() would one by one (a merge
   * drops a batch from its highest chunk down); whole run tails go in one step.
   */
  removeRun(old: number, count: number): void {
    checkOld(old)
    let end = old + count // chunks [old, end) are still to remove
    while (end > old) {
      const last = end - 1
      const i = this.findSlot(last)
      if (i < 0) {
        throw new SnapError('SNAP_CORRUPT_METADATA', `exception for chunk ${last} is not in memory`, { details: { chunk: last } })
      }
      const m = this.meta[i]!
      const eCount = m & 0xff
      const runFirst = Math.floor(last / GROUP) * GROUP + ((m >>> 8) & 0xff)
      if (last !== runFirst + eCount || eCount === 0) {
        this.remove(last) // the front of a run, a one-chunk run, or a middle hit (refused)
        end--
        continue
      }
      const k = Math.min(end - Math.max(old, runFirst), eCount + 1)
      if (k === eCount + 1) {
        this.deleteSlot(i)
        this.runsUsed--
      } else {
        this.meta[i] = m - k
      }
      this.chunks -= k
      end -= k
    }
  }

  /** First mapped chunk in [old, end), or `end` when none is: one cluster scan per group. */
  nextMapped(old: number, end: number): number {
    if (this.chunks === 0 || old >= end) return end
    const meta = this.meta
    const keyLo = this.keyLo
    const cap = this.capacity
    for (let group = Math.floor(old / GROUP); group * GROUP < end; group++) {
      const from = Math.max(old, group * GROUP) - group * GROUP
      const gHi = Math.floor(group / TWO32)
      const gLo = (group - gHi * TWO32) | 0
      const tag = OCCUPIED | (gHi << 24)
      let best = GROUP
      let i = hashGroup(gLo, gHi) % cap
      for (let m = meta[i]!; m !== 0; m = meta[i]!) {
        if ((m & 0xff000000) === tag && keyLo[i] === gLo) {
          const eOff = (m >>> 8) & 0xff
          if (eOff + (m & 0xff) >= from) best = Math.min(best, Math.max(eOff, from))
        }
        if (++i === cap) i = 0
      }
      if (best < GROUP) return Math.min(end, group * GROUP + best)
    }
    return end
  }

  /** First unmapped chunk in [old, end), or `end` when all are mapped: one lookup per run. */
  nextUnmapped(old: number, end: number): number {
    let c = old
    while (c < end) {
      const i = this.findSlot(c)
      if (i < 0) return c
      const m = this.meta[i]!
      c = Math.floor(c / GROUP) * GROUP + ((m >>> 8) & 0xff) + (m & 0xff) + 1
    }
    return end
  }

  /**
   * The chunks from `old` (up to `end`) that are mapped AND consecutive in the COW, across
   * runs and groups: one COW read or write covers them. Null when `old` is not mapped.
   */
  mappedRun(old: number, end: number): { readonly cow: number; readonly count: number } | null {
    const i = this.findSlot(old)
    if (i < 0) return null
    const m = this.meta[i]!
    const runFirst = Math.floor(old / GROUP) * GROUP + ((m >>> 8) & 0xff)
    const cow = ((m >>> 16) & 0xff) * TWO32 + (this.newLo[i]! >>> 0) + (old - runFirst)
    let next = runFirst + (m & 0xff) + 1
    while (next < end) {
      const j = this.findSlot(next)
      if (j < 0) break
      const mj = this.meta[j]!
      const first = Math.floor(next / GROUP) * GROUP + ((mj >>> 8) & 0xff)
      if (((mj >>> 16) & 0xff) * TWO32 + (this.newLo[j]! >>> 0) + (next - first) !== cow + (next - old)) break
      next = first + (mj & 0xff) + 1
    }
    return { cow, count: Math.min(next, end) - old }
  }

  /**
   * Every run, in slot order (not sorted). Mutating the table while iterating is not supported:
   * the iterator keeps reading the arrays it started with, so it never crashes, but runs may be
   * missed or repeated.
   */
  *runs(): IterableIterator<ExceptionRun> {
    const meta = this.meta
    const keyLo = this.keyLo
    const newLo = this.newLo
    const cap = this.capacity
    for (let i = 0; i < cap; i++) {
      const m = meta[i]!
      if (m === 0) continue
      yield {
        old: (((m >>> 24) & 0x7f) * TWO32 + (keyLo[i]! >>> 0)) * GROUP + ((m >>> 8) & 0xff),
        new: ((m >>> 16) & 0xff) * TWO32 + (newLo[i]! >>> 0),
        count: m & 0xff,
      }
    }
  }

  /** Calls fn for every mapped chunk (run order unspecified, ascending inside a run). */
  forEachChunk(fn: (old: number, cow: number) => void): void {
    const meta = this.meta
    const keyLo = this.keyLo
    const newLo = this.newLo
    for (let i = 0; i < this.capacity; i++) {
      const m = meta[i]!
      if (m === 0) continue
      const old = (((m >>> 24) & 0x7f) * TWO32 + (keyLo[i]! >>> 0)) * GROUP + ((m >>> 8) & 0xff)
      const cow = ((m >>> 16) & 0xff) * TWO32 + (newLo[i]! >>> 0)
      const count = m & 0xff
      for (let k = 0; k <= count; k++) fn(old + k, cow + k)
    }
  }

  private runAt(i: number, group: number): ExceptionRun {
    const m = this.meta[i]!
    return {
      old: group * GROUP + ((m >>> 8) & 0xff),
      new: ((m >>> 16) & 0xff) * TWO32 + (this.newLo[i]! >>> 0),
      count: m & 0xff,
    }
  }

  /** Slot of the run containing `old`, or -1. Out-of-range input simply is not mapped. */
  private findSlot(old: number): number {
    if (!(old >= 0 && old < MAX_ORIGIN_CHUNK)) return -1
    const group = Math.floor(old / GROUP)
    const off = old - group * GROUP
    // a fractional chunk number can never be mapped (and would break the int math below)
    if (off !== Math.floor(off)) return -1
    const gHi = Math.floor(group / TWO32)
    const gLo = (group - gHi * TWO32) | 0
    const tag = OCCUPIED | (gHi << 24)
    const keyLo = this.keyLo
    const meta = this.meta
    const cap = this.capacity
    let i = hashGroup(gLo, gHi) % cap
    for (let m = meta[i]!; m !== 0; m = meta[i]!) {
      if ((m & 0xff000000) === tag && keyLo[i] === gLo) {
        const eOff = (m >>> 8) & 0xff
        if (off >= eOff && off <= eOff + (m & 0xff)) return i
      }
      if (++i === cap) i = 0
    }
    return -1
  }

  private homeOf(i: number): number {
    const m = this.meta[i]!
    return hashGroup(this.keyLo[i]!, (m >>> 24) & 0x7f) % this.capacity
  }

  /** Backward-shift deletion: pull later cluster members into the hole when their home allows. */
  private deleteSlot(hole: number): void {
    const keyLo = this.keyLo
    const newLo = this.newLo
    const meta = this.meta
    const cap = this.capacity
    let j = hole
    for (;;) {
      if (++j === cap) j = 0
      if (meta[j] === 0) break
      const home = this.homeOf(j)
      // the entry at j may move to the hole only if its home is NOT cyclically in (hole, j]
      const stays = hole <= j ? home > hole && home <= j : home > hole || home <= j
      if (stays) continue
      keyLo[hole] = keyLo[j]!
      newLo[hole] = newLo[j]!
      meta[hole] = meta[j]!
      hole = j
    }
    keyLo[hole] = 0
    newLo[hole] = 0
    meta[hole] = 0
  }

  private grow(): void {
    const oldCap = this.capacity
    const cap = Math.ceil(oldCap * GROWTH)
    if (cap > MAX_CAPACITY) {
      throw new SnapError('SNAP_OUT_OF_RANGE', `exception table cannot grow beyond ${MAX_CAPACITY} runs`)
    }
    const oKey = this.keyLo
    const oNew = this.newLo
    const oMeta = this.meta
    const keyLo = new Int32Array(cap)
    const newLo = new Int32Array(cap)
    const meta = new Int32Array(cap)
    for (let s = 0; s < oldCap; s++) {
      const m = oMeta[s]!
      if (m === 0) continue
      let i = hashGroup(oKey[s]!, (m >>> 24) & 0x7f) % cap
      while (meta[i] !== 0) if (++i === cap) i = 0
      keyLo[i] = oKey[s]!
      newLo[i] = oNew[s]!
      meta[i] = m
    }
    this.keyLo = keyLo
    this.newLo = newLo
    this.meta = meta
    this.capacity = cap
    this.growAt = Math.floor(cap * MAX_LOAD)
  }
}
