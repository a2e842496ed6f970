/**
 * The in-memory table of COMPLETE exceptions of one snapshot (origin chunk -> COW chunk), with
 * the kernel's consecutive-run compression (dm-snapshot behaviour reference §5).
 *
 * Why not a Map: a Map holds at most 2^24 entries and costs ~50-80 bytes per entry, while a
 * snapshot of a large device can hold 10^8 exceptions. This table keeps one 12-byte slot per
 * run in a single Int32Array (plus one occupancy bit) and stays between load 0.78 and 0.9, so
 * memory is <= 15.5 bytes per exception (plus a tail of <= 1024 slots) at every size even when
 * nothing compresses (the old 1.5x growth at load 0.8 swung between 15 and 22.6), and
 * sequential copy-outs compress up to 256 chunks per slot.
 *
 * Layout decisions:
 * - The hash key is the GROUP `floor(old / 256)`, exactly like the kernel's `old >> 8` bucket,
 *   so every run of a group sits next to the others and an insert finds the run it extends.
 *   Runs never cross a group, so offset and count both fit in 8 bits.
 * - Slot = [hash, new % 2^32, meta] interleaved in one array: a probe reads one cache line, not
 *   three. The stored hash is a bijection of the group (murmur's finaliser is invertible), so
 *   it replaces the group: no second key word, no rehashing while probing or growing.
 * - Ordered linear probing (Amble & Knuth; Robin Hood with ties broken by key): slots hold runs
 *   sorted by (hash, group high bits, offset), home = hash * capacity / 2^32 is monotone in the
 *   hash, and every run sits at max(home, previous run's slot + 1). The layout is a function of
 *   the set of runs alone, so bulk load and one-by-one insert agree; a lookup, hit or miss, is a
 *   search for the first slot past its key, which is monotone from its home on (an empty slot
 *   or a later home only holds bigger keys): a few linear steps, then galloping binary search,
 *   so the long clusters of load 0.9 (and of groups holding up to 256 runs) cost log of their
 *   length. Deletion shifts the cluster back: no tombstones, so merge never degrades lookups.
 * - No wrap-around: homes are [0, capacity), runs pushed past the end go into a tail of extra
 *   slots whose last slot always stays empty (so scans need no bounds check). The tail size is a
 *   function of capacity and of the highest slot used in this capacity, again history-free.
 * - Growth by 1.15x at load 0.9 (load 0.78 right after): because the order of slots is the
 *   order of hashes in every capacity, growing is one streaming pass that places runs in order,
 *   not a random reinsertion, so the many small growths cost less than 1.5x growths did before.
 * - Numbers above 2^32 are split with multiplication/division: JS shifts are 32-bit.
 */
import { SnapError } from '../errors.js'
import { type SortedKeys, radixSortWithIndex } from '../util/radix-sort.js'

/** Origin chunk numbers must be below this (group < 2^36: 4 bits of group above the hash). */
export const MAX_ORIGIN_CHUNK = 2 ** 44
/** COW chunk numbers must be below this (newHi fits 8 bits). */
export const MAX_COW_CHUNK = 2 ** 40

/** Chunks per group: the kernel buckets complete exceptions by `old >> 8`. */
const GROUP = 256
const TWO32 = 4294967296

// A slot is three int32 words: HASH = fmix(group % 2^32 ^ mix(group / 2^32)), NEW = COW chunk
// of the run's first chunk % 2^32, META: bit 31 = occupied (so an empty slot has META 0),
// bits 24..27 = group / 2^32, bits 16..23 = new / 2^32, bits 8..15 = old % 256, bits 0..7 = count.
const STRIDE = 3
const OCCUPIED = -0x80000000

const INITIAL_CAPACITY = 64
const MAX_LOAD = 0.9
const GROWTH = 1.15
// slot * STRIDE stays an int32; about 6.4e8 runs
const MAX_CAPACITY = Math.floor(0x7fffffff / STRIDE) - 4096
// probes scanned one by one before a search gallops: most runs sit within a few slots of home
const LINEAR_PROBES = 8

export interface ExceptionRun {
  /** First origin chunk. */
  readonly old: number
  /** COW chunk of `old`; origin chunk old+k maps to new+k. */
  readonly new: number
  /** Number of chunks after the first, 0..255. */
  readonly count: number
}

/** murmur3's 32-bit finaliser: a bijection, so the hash can stand in for the group. */
function fmix(x: number): number {
  x ^= x >>> 16
  x = Math.imul(x, 0x85ebca6b)
  x ^= x >>> 13
  x = Math.imul(x, 0xc2b2ae35)
  x ^= x >>> 16
  return x
}

function unfmix(x: number): number {
  x ^= x >>> 16
  x = Math.imul(x, 0x7ed1b41d)
  x ^= (x >>> 13) ^ (x >>> 26)
  x = Math.imul(x, 0xa5cb9243)
  x ^= x >>> 16
  return x
}

/** Hash of a group split as (low 32 bits, high bits): sequential groups land far apart. */
function hashGroup(gLo: number, gHi: number): number {
  return fmix(gLo ^ Math.imul(gHi, 0x9e3779b1))
}

/** Low 32 bits of the group whose hash is `h` (as uint32). */
function groupLoOf(h: number, gHi: number): number {
  return (unfmix(h) ^ Math.imul(gHi, 0x9e3779b1)) >>> 0
}

/** Home slot of a hash: monotone in the hash, so slot order is hash order. */
function homeOf(h: number, capacity: number): number {
  return Math.floor((h >>> 0) * capacity / TWO32)
}

/**
 * A run's sort key is (hash as uint32, sub) with sub = group high bits * 256 + offset. Compared
 * in two int32 parts rather than as one 44-bit double: a double that is not a small integer is a
 * heap number wherever the compiler does not keep it unboxed, and seek() ran on every lookup.
 */
function subOf(m: number): number {
  return ((m >>> 16) & 0xf00) | ((m >>> 8) & 0xff)
}

/** Whether the run (stored hash `sh`, meta `m`) sorts above the key (h, sub); sub may be -1. */
function above(sh: number, m: number, h: number, sub: number): boolean {
  // the sign flip makes the signed int32 comparison an unsigned one
  return sh === h ? subOf(m) > sub : (sh ^ 0x80000000) > (h ^ 0x80000000)
}

/** Tail slots past the homes: a few per cent, doubled until the highest used slot fits. */
function tailFor(capacity: number, lastUsed: number): number {
  let tail = Math.min(1024, Math.max(16, capacity >>> 3))
  while (capacity + tail < lastUsed + 2) tail *= 2
  return tail
}

/** Highest slot runs with these hashes (ascending) take in a table of `capacity` homes. */
function lastSlotOf(hashes: Uint32Array, runs: number, capacity: number): number {
  let last = -1
  for (let r = 0; r < runs; r++) {
    const home = homeOf(hashes[r]!, capacity)
    last = home > last ? home : last + 1
  }
  return last
}

function usedWords(slotCount: number): number {
  return (slotCount + 31) >>> 5
}

/** The occupancy bitmap of a filled slot array. */
function usedOf(slots: Int32Array, slotCount: number): Int32Array {
  const used = new Int32Array(usedWords(slotCount))
  for (let i = 0; i < slotCount; i++) if (slots[i * STRIDE + 2] !== 0) used[i >>> 5]! |= 1 << (i & 31)
  return used
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

/**
 * radixSortWithIndex's result for bulkLoad, without sorting when the origin chunks already
 * ascend strictly (a table written by sequential changes, the common case): then the sort would
 * return the keys unchanged with the payload (or the positions) beside them. One pass over the
 * keys instead of three passes of a sort that moves them all.
 */
function sortByOld(oldChunks: Uint32Array, count: number, payload: Uint32Array | null): SortedKeys {
  for (let i = 1; i < count; i++) {
    if (oldChunks[i]! <= oldChunks[i - 1]!) return radixSortWithIndex(oldChunks, count, payload)
  }
  if (payload !== null) return { keys: oldChunks, index: payload }
  const index = new Uint32Array(count)
  for (let i = 0; i < count; i++) index[i] = i
  return { keys: oldChunks, index }
}

export class ExceptionTable {
  /** Home slots; the array also holds `tail` slots after them. */
  private capacity = INITIAL_CAPACITY
  private slotCount = INITIAL_CAPACITY + tailFor(INITIAL_CAPACITY, 0)
  private growAt = Math.floor(INITIAL_CAPACITY * MAX_LOAD)
  private slots: Int32Array = new Int32Array(this.slotCount * STRIDE)
  // bit i set = slot i occupied: finds the end of a cluster 32 slots per step when an insert
  // shifts it (crowded groups make clusters of hundreds of slots); 1/96 of the slot bytes
  private used: Int32Array = new Int32Array(usedWords(this.slotCount))
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

  /** Bytes held by the typed array backing the table. */
  memoryBytes(): number {
    return this.slots.byteLength + this.used.byteLength
  }

  clear(): void {
    this.capacity = INITIAL_CAPACITY
    this.slotCount = INITIAL_CAPACITY + tailFor(INITIAL_CAPACITY, 0)
    this.growAt = Math.floor(INITIAL_CAPACITY * MAX_LOAD)
    this.slots = new Int32Array(this.slotCount * STRIDE)
    this.used = new Int32Array(usedWords(this.slotCount))
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
    const h = hashGroup((group - gHi * TWO32) | 0, gHi)
    const groupTag = OCCUPIED | (gHi << 24)
    const s = this.slots
    // q: first slot past (h, gHi, off). Runs are disjoint and sorted by offset, so only the run
    // before q can hold `off` or end just below it, and only the run at q can start above it.
    const q = this.seek(h, (gHi << 8) | off)
    if (q > 0) {
      const p = q - 1
      const m = s[p * STRIDE + 2]!
      if (m !== 0 && s[p * STRIDE] === h && (m & 0xff000000) === groupTag) {
        const eOff = (m >>> 8) & 0xff
        const eCount = m & 0xff
        if (off <= eOff + eCount) throw new Error(`exception table: origin chunk ${old} is already mapped`)
        const eNew = ((m >>> 16) & 0xff) * TWO32 + (s[p * STRIDE + 1]! >>> 0)
        if (off === eOff + eCount + 1 && cow === eNew + eCount + 1) {
          // the run stays inside the group because off <= 255, so count + 1 <= 255
          s[p * STRIDE + 2] = m + 1
          this.chunks++
          return
        }
      }
    }
    const mq = s[q * STRIDE + 2]!
    if (mq !== 0 && s[q * STRIDE] === h && (mq & 0xff000000) === groupTag) {
      const eOff = (mq >>> 8) & 0xff
      const eNew = ((mq >>> 16) & 0xff) * TWO32 + (s[q * STRIDE + 1]! >>> 0) - 1
      if (off === eOff - 1 && cow === eNew) {
        const nHi = Math.floor(eNew / TWO32)
        s[q * STRIDE + 1] = (eNew - nHi * TWO32) | 0
        s[q * STRIDE + 2] = (mq & 0xff000000) | (nHi << 16) | (off << 8) | ((mq & 0xff) + 1)
        this.chunks++
        return
      }
    }
    const nHi = Math.floor(cow / TWO32)
    this.placeAt(q, h, (cow - nHi * TWO32) | 0, groupTag | (nHi << 16) | (off << 8))
    this.chunks++
    if (++this.runsUsed > this.growAt) this.grow()
  }

  /**
   * Loads an empty table with entries given in table order (oldChunks[i] -> newChunks[i]),
   * leaving exactly what insert() of each entry in that order would: the same chunks, the same
   * runs, the same slots (the layout depends on the runs alone). Much faster than inserting
   * random chunks into crowded groups one by one: the entries are sorted by origin chunk to find
   * the runs, the runs by hash, and the slots are filled in one pass.
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
    const { keys, index: order } = sortByOld(oldChunks, count, byNew ? newChunks : null)
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
    // The runs in origin order (so each group's runs by offset), then stably by hash: all old
    // chunks are below 2^32, so no two groups share a hash and this is the slot order.
    const runHash = new Uint32Array(runs)
    const runOld = new Uint32Array(runs)
    const runNew = new Uint32Array(runs)
    const runLast = new Uint8Array(runs)
    for (let i = 0, r = -1; i < count; i++) {
      if (starts[i] === 0) {
        runLast[r]!++
        continue
      }
      r++
      const old = keys[i]!
      runHash[r] = hashGroup(old >>> 8, 0)
      runOld[r] = old
      runNew[r] = newOf(i)
    }
    const sorted = radixSortWithIndex(runHash, runs)
    const hashes = sorted.keys
    const slotCount = cap + tailFor(cap, lastSlotOf(hashes, runs, cap))
    const slots = new Int32Array(slotCount * STRIDE)
    for (let r = 0, prev = -1; r < runs; r++) {
      const home = homeOf(hashes[r]!, cap)
      prev = home > prev ? home : prev + 1
      const i = sorted.index[r]!
      const at = prev * STRIDE
      slots[at] = hashes[r]! | 0
      slots[at + 1] = runNew[i]! | 0
      slots[at + 2] = OCCUPIED | ((runOld[i]! & 0xff) << 8) | runLast[i]!
    }
    this.slots = slots
    this.used = usedOf(slots, slotCount)
    this.slotCount = slotCount
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
    const m = this.slots[i * STRIDE + 2]!
    const first = Math.floor(old / GROUP) * GROUP + ((m >>> 8) & 0xff)
    return ((m >>> 16) & 0xff) * TWO32 + (this.slots[i * STRIDE + 1]! >>> 0) + (old - first)
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
    const s = this.slots
    const at = i * STRIDE
    const m = s[at + 2]!
    const eOff = (m >>> 8) & 0xff
    const eCount = m & 0xff
    const off = old % GROUP
    if (eCount === 0) {
      this.deleteSlot(i)
      this.runsUsed--
    } else if (off === eOff) {
      // the run's key grows from eOff to eOff + 1, still below the next run of the group
      const eNew = ((m >>> 16) & 0xff) * TWO32 + (s[at + 1]! >>> 0) + 1
      const nHi = Math.floor(eNew / TWO32)
      s[at + 1] = (eNew - nHi * TWO32) | 0
      s[at + 2] = (m & 0xff000000) | (nHi << 16) | ((eOff + 1) << 8) | (eCount - 1)
    } else if (off === eOff + eCount) {
      s[at + 2] = m - 1
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
   * leaves (the same runs), with one search per group instead of one per chunk. A chunk
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
        const at = this.findSlot(o) * STRIDE + 2
        this.slots[at] = this.slots[at]! + (seg - 1)
        this.chunks += seg - 1
      }
      done += seg
    }
  }

  /** Throws if any of `count` chunks from `old` (all in one group) is mapped. */
  private checkFree(old: number, count: number): void {
    const group = Math.floor(old / GROUP)
    const off = old - group * GROUP
    const first = this.firstMappedInGroup(group, off)
    if (first >= 0 && first < off + count) {
      throw new Error(`exception table: origin chunk ${group * GROUP + first} is already mapped`)
    }
  }

  /** Smallest mapped offset >= `from` in `group`, or -1: one search and a walk of the group. */
  private firstMappedInGroup(group: number, from: number): number {
    const gHi = Math.floor(group / TWO32)
    const h = hashGroup((group - gHi * TWO32) | 0, gHi)
    const groupTag = OCCUPIED | (gHi << 24)
    const s = this.slots
    // first slot past every run of the group that starts below `from`; the run before it may
    // still reach `from`
    const i = this.seek(h, ((gHi << 8) | from) - 1)
    if (i > 0) {
      const m = s[(i - 1) * STRIDE + 2]!
      if (m !== 0 && s[(i - 1) * STRIDE] === h && (m & 0xff000000) === groupTag && ((m >>> 8) & 0xff) + (m & 0xff) >= from) {
        return from
      }
    }
    const m = s[i * STRIDE + 2]!
    if (m !== 0 && s[i * STRIDE] === h && (m & 0xff000000) === groupTag) return (m >>> 8) & 0xff
    return -1
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
      const m = this.slots[i * STRIDE + 2]!
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
        this.slots[i * STRIDE + 2] = m - k
      }
      this.chunks -= k
      end -= k
    }
  }

  /** First mapped chunk in [old, end), or `end` when none is: one search per group. */
  nextMapped(old: number, end: number): number {
    if (this.chunks === 0 || old >= end) return end
    for (let group = Math.floor(old / GROUP); group * GROUP < end; group++) {
      const from = Math.max(old, group * GROUP) - group * GROUP
      const first = this.firstMappedInGroup(group, from)
      if (first >= 0) return Math.min(end, group * GROUP + first)
    }
    return end
  }

  /** First unmapped chunk in [old, end), or `end` when all are mapped: one lookup per run. */
  nextUnmapped(old: number, end: number): number {
    let c = old
    while (c < end) {
      const i = this.findSlot(c)
      if (i < 0) return c
      const m = this.slots[i * STRIDE + 2]!
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
    const s = this.slots
    const m = s[i * STRIDE + 2]!
    const runFirst = Math.floor(old / GROUP) * GROUP + ((m >>> 8) & 0xff)
    const cow = ((m >>> 16) & 0xff) * TWO32 + (s[i * STRIDE + 1]! >>> 0) + (old - runFirst)
    let next = runFirst + (m & 0xff) + 1
    while (next < end) {
      const j = this.findSlot(next)
      if (j < 0) break
      const mj = s[j * STRIDE + 2]!
      const first = Math.floor(next / GROUP) * GROUP + ((mj >>> 8) & 0xff)
      if (((mj >>> 16) & 0xff) * TWO32 + (s[j * STRIDE + 1]! >>> 0) + (next - first) !== cow + (next - old)) break
      next = first + (mj & 0xff) + 1
    }
    return { cow, count: Math.min(next, end) - old }
  }

  /**
   * Every run, in slot order (not sorted). Mutating the table while iterating is not supported:
   * the iterator keeps reading the array it started with, so it never crashes, but runs may be
   * missed or repeated.
   */
  *runs(): IterableIterator<ExceptionRun> {
    const s = this.slots
    const n = this.slotCount
    for (let i = 0; i < n; i++) {
      if (s[i * STRIDE + 2] === 0) continue
      yield this.runAtSlot(s, i)
    }
  }

  /** Calls fn for every mapped chunk (run order unspecified, ascending inside a run). */
  forEachChunk(fn: (old: number, cow: number) => void): void {
    const s = this.slots
    for (let i = 0; i < this.slotCount; i++) {
      if (s[i * STRIDE + 2] === 0) continue
      const run = this.runAtSlot(s, i)
      for (let k = 0; k <= run.count; k++) fn(run.old + k, run.new + k)
    }
  }

  private runAtSlot(s: Int32Array, i: number): ExceptionRun {
    const m = s[i * STRIDE + 2]!
    const gHi = (m >>> 24) & 0xf
    const group = gHi * TWO32 + groupLoOf(s[i * STRIDE]!, gHi)
    return this.runAt(i, group)
  }

  private runAt(i: number, group: number): ExceptionRun {
    const m = this.slots[i * STRIDE + 2]!
    return {
      old: group * GROUP + ((m >>> 8) & 0xff),
      new: ((m >>> 16) & 0xff) * TWO32 + (this.slots[i * STRIDE + 1]! >>> 0),
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
    const h = hashGroup((group - gHi * TWO32) | 0, gHi)
    // the run holding `off` is the last one whose key is <= (h, gHi, off)
    const q = this.seek(h, (gHi << 8) | off)
    if (q === 0) return -1
    const p = q - 1
    const s = this.slots
    const m = s[p * STRIDE + 2]!
    if (m === 0 || s[p * STRIDE] !== h || ((m >>> 24) & 0xf) !== gHi) return -1
    return off <= ((m >>> 8) & 0xff) + (m & 0xff) ? p : -1
  }

  /**
   * The first slot from h's home on that is empty or holds a key above (h, sub). "Empty or above"
   * is monotone over those slots (runs are sorted, and past an empty slot every home, hence
   * every hash, is higher), so after a few linear steps the search gallops.
   */
  private seek(h: number, sub: number): number {
    const s = this.slots
    let lo = homeOf(h, this.capacity)
    for (let k = 0; k < LINEAR_PROBES; k++, lo++) {
      const m = s[lo * STRIDE + 2]!
      if (m === 0 || above(s[lo * STRIDE]!, m, h, sub)) return lo
    }
    // every slot before lo holds a key <= `key`; the last slot is always empty
    const last = this.slotCount - 1
    let step = LINEAR_PROBES
    let hi = Math.min(lo + step, last)
    for (;;) {
      const m = s[hi * STRIDE + 2]!
      if (m === 0 || above(s[hi * STRIDE]!, m, h, sub)) break
      lo = hi + 1
      step *= 2
      hi = Math.min(lo + step, last)
    }
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      const m = s[mid * STRIDE + 2]!
      if (m === 0 || above(s[mid * STRIDE]!, m, h, sub)) hi = mid
      else lo = mid + 1
    }
    return lo
  }

  /** Puts a new run at slot q, shifting the rest of its cluster one slot up. */
  private placeAt(q: number, h: number, newLo: number, meta: number): void {
    let s = this.slots
    let used = this.used
    // e: the first empty slot from q on (the last slot is always empty)
    let w = q >>> 5
    let free = ~used[w]! & (-1 << (q & 31))
    while (free === 0) free = ~used[++w]!
    const e = (w << 5) + (31 - Math.clz32(free & -free))
    if (e === this.slotCount - 1) {
      // the last slot must stay empty: a longer tail (a function of the highest slot used)
      const slotCount = this.capacity + tailFor(this.capacity, e)
      const grown = new Int32Array(slotCount * STRIDE)
      grown.set(s)
      const grownUsed = new Int32Array(usedWords(slotCount))
      grownUsed.set(used)
      this.slots = s = grown
      this.used = used = grownUsed
      this.slotCount = slotCount
    }
    used[e >>> 5]! |= 1 << (e & 31)
    if (e - q > 16) s.copyWithin((q + 1) * STRIDE, q * STRIDE, e * STRIDE)
    else for (let j = e * STRIDE - 1; j >= q * STRIDE; j--) s[j + STRIDE] = s[j]!
    s[q * STRIDE] = h
    s[q * STRIDE + 1] = newLo
    s[q * STRIDE + 2] = meta
  }

  /** Backward shift: the runs after the hole move down until one is at its home (or a gap). */
  private deleteSlot(hole: number): void {
    const s = this.slots
    const cap = this.capacity
    let e = hole + 1
    for (;;) {
      const m = s[e * STRIDE + 2]!
      if (m === 0 || homeOf(s[e * STRIDE]!, cap) === e) break
      e++
    }
    // runs in (hole, e) sit past their homes; each moves down one slot
    s.copyWithin(hole * STRIDE, (hole + 1) * STRIDE, e * STRIDE)
    s.fill(0, (e - 1) * STRIDE, e * STRIDE)
    this.used[(e - 1) >>> 5]! &= ~(1 << ((e - 1) & 31))
  }

  private grow(): void {
    const cap = Math.ceil(this.capacity * GROWTH)
    if (cap > MAX_CAPACITY) {
      throw new SnapError('SNAP_OUT_OF_RANGE', `exception table cannot grow beyond ${MAX_CAPACITY} runs`)
    }
    // Slot order is hash order in every capacity: walk the old slots, filling the new ones in
    // order. The tail is what tailFor gives for the highest slot used, so the layout stays
    // history-free; the default one nearly always suffices, else a second pass fits it.
    const old = this.slots
    const oldCount = this.slotCount
    let slots = new Int32Array(0)
    let used = new Int32Array(0)
    let slotCount = 0
    for (let lastUsed = 0; ; ) {
      slotCount = cap + tailFor(cap, lastUsed)
      slots = new Int32Array(slotCount * STRIDE)
      used = new Int32Array(usedWords(slotCount))
      let prev = -1
      let i = 0
      for (; i < oldCount; i++) {
        const from = i * STRIDE
        const m = old[from + 2]!
        if (m === 0) continue
        const h = old[from]!
        const home = homeOf(h, cap)
        prev = home > prev ? home : prev + 1
        if (prev === slotCount - 1) break
        const at = prev * STRIDE
        slots[at] = h
        slots[at + 1] = old[from + 1]!
        slots[at + 2] = m
        used[prev >>> 5]! |= 1 << (prev & 31)
      }
      if (i === oldCount) break
      for (i++; i < oldCount; i++) {
        if (old[i * STRIDE + 2] === 0) continue
        const home = homeOf(old[i * STRIDE]!, cap)
        prev = home > prev ? home : prev + 1
      }
      lastUsed = prev
    }
    this.slots = slots
    this.used = used
    this.slotCount = slotCount
    this.capacity = cap
    this.growAt = Math.floor(cap * MAX_LOAD)
  }
}
