/**
 * Origin writes that were acknowledged before they reached the origin device (write-back).
 *
 * A first-touch origin write may not reach the device before every snapshot's copy of the old
 * chunk is committed, which takes two device syncs in a row (data, then the entries). Rather
 * than keep the client waiting for them, the origin can answer as soon as the copies are
 * started and hold the new bytes here until they land. Meanwhile:
 * - origin reads see the held bytes on top of what the device returns (newest last);
 * - a later write or discard of the same bytes lands strictly after every earlier held write;
 * - a flush waits until everything held before it has landed.
 * Held bytes are like a disk's volatile write cache: lost in a crash unless flushed, never able
 * to leak into a snapshot, since the device itself is not touched before the copies commit.
 *
 * Writes are indexed by 64 KiB buckets, so finding the few held writes that overlap a request
 * never scans the whole set. A held write's bytes live in a buffer from the engine's pool, which
 * goes back once the write has left the set and no read that found it still has to copy from it.
 */
import { type Deferred, deferred } from '../util/deferred.js'
import { enginePool } from '../util/buffer-pool.js'

const BUCKET_BYTES = 64 * 1024

/** What overlapping() finds when nothing overlaps: one shared empty list, not a new one per request. */
const NONE: readonly HeldWrite[] = Object.freeze([])

export class HeldWrite {
  readonly offset: number
  readonly data: Uint8Array
  /** Acceptance order: when two held writes overlap, the higher one is newer. */
  readonly seq: number
  private left = false
  /** Reads that found this write and have not copied its bytes yet (pinForRead). */
  private readers = 0
  private listeners: Array<() => void> | null = null
  /** Made only when someone asks for a promise. */
  private landing: Deferred<void> | null = null
  /**
   * @internal HeldWrites' list of the writes it holds, oldest first (its links, changed only by
   * HeldWrites): a list rather than a Set, whose insert and delete per write, and rehashing, were
   * a visible part of the write-back path.
   */
  older: HeldWrite | null = null
  newer: HeldWrite | null = null
  held = false

  constructor(offset: number, data: Uint8Array, seq: number) {
    this.offset = offset
    this.data = data
    this.seq = seq
  }

  get end(): number {
    return this.offset + this.data.length
  }

  /** Resolves (never rejects) once the write has left the set, landed or failed. */
  get landed(): Promise<void> {
    if (this.left) return Promise.resolve()
    this.landing ??= deferred<void>()
    return this.landing.promise
  }

  /** Calls `fn` once the write has left the set (at once if it has): `landed` without a promise. */
  whenLanded(fn: () => void): void {
    if (this.left) fn()
    else (this.listeners ??= []).push(fn)
  }

  /** A read will copy from `data` later: the buffer stays until unpin(). */
  pin(): void {
    this.readers++
  }

  unpin(): void {
    if (--this.readers === 0 && this.left) enginePool.release(this.data)
  }

  markLanded(): void {
    if (this.left) return
    this.left = true
    if (this.readers === 0) enginePool.release(this.data)
    const listeners = this.listeners
    this.listeners = null
    if (listeners) for (const fn of listeners) fn()
    this.landing?.resolve()
  }
}

/** Calls `fn` once every write in `writes` has left the set (at once when none is held). */
export function whenAllLanded(writes: readonly HeldWrite[], fn: () => void): void {
  if (writes.length === 1) return (writes[0] as HeldWrite).whenLanded(fn)
  let left = writes.length + 1
  const one = (): void => {
    if (--left === 0) fn()
  }
  for (const w of writes) w.whenLanded(one)
  one()
}

export class HeldWrites {
  /** Most bytes held at once; 0 turns write-back off. */
  readonly limitBytes: number
  /** The writes overlapping each bucket: one write on its own (the usual case), several in an array. */
  private readonly buckets = new Map<number, HeldWrite | HeldWrite[]>()
  /** Every held write, oldest first (linked through the writes). */
  private oldest: HeldWrite | null = null
  private newest: HeldWrite | null = null
  private count = 0
  private heldBytes = 0
  private nextSeq = 0

  constructor(limitBytes: number) {
    this.limitBytes = limitBytes
  }

  get size(): number {
    return this.count
  }

  get bytes(): number {
    return this.heldBytes
  }

  hasRoomFor(length: number): boolean {
    return this.heldBytes + length <= this.limitBytes
  }

  /**
   * Holds a copy of `data` for [offset, offset + data.length): the write is answered before it
   * lands, and the BlockDevice contract lets the caller reuse its buffer once answered.
   */
  add(offset: number, data: Uint8Array): HeldWrite {
    const owned = enginePool.acquire(data.length)
    owned.set(data)
    const write = new HeldWrite(offset, owned, this.nextSeq++)
    write.held = true
    write.older = this.newest
    if (this.newest === null) this.oldest = write
    else this.newest.newer = write
    this.newest = write
    this.count++
    this.heldBytes += owned.length
    for (let b = Math.floor(offset / BUCKET_BYTES), last = Math.floor((write.end - 1) / BUCKET_BYTES); b <= last; b++) {
      const list = this.buckets.get(b)
      if (list === undefined) this.buckets.set(b, write)
      else if (list instanceof HeldWrite) this.buckets.set(b, [list, write])
      else list.push(write)
    }
    return write
  }

  /**
   * Drops `write` from the set and wakes everything waiting for it to land. False (and nothing
   * done) when it had left already.
   */
  release(write: HeldWrite): boolean {
    if (!write.held) return false
    write.held = false
    if (write.older === null) this.oldest = write.newer
    else write.older.newer = write.newer
    if (write.newer === null) this.newest = write.older
    else write.newer.older = write.older
    write.older = null
    write.newer = null
    this.count--
    this.heldBytes -= write.data.length
    for (let b = Math.floor(write.offset / BUCKET_BYTES), last = Math.floor((write.end - 1) / BUCKET_BYTES); b <= last; b++) {
      const list = this.buckets.get(b) as HeldWrite | HeldWrite[]
      if (list === write) this.buckets.delete(b)
      else if (Array.isArray(list)) {
        list.splice(list.indexOf(write), 1)
        if (list.length === 1) this.buckets.set(b, list[0] as HeldWrite)
      }
    }
    write.markLanded()
    return true
  }

  /** The byte range [start, end) of every held write, in no order (bounded by limitBytes). */
  ranges(): Array<[number, number]> {
    return this.list().map((w) => [w.offset, w.end])
  }

  /** The held writes overlapping [offset, offset + length), oldest first (a list not to be changed). */
  overlapping(offset: number, length: number): readonly HeldWrite[] {
    if (this.count === 0 || length === 0) return NONE
    const end = offset + length
    const first = Math.floor(offset / BUCKET_BYTES)
    const last = Math.floor((end - 1) / BUCKET_BYTES)
    let found: HeldWrite[] | null = null
    for (let b = first; b <= last; b++) {
      const list = this.buckets.get(b)
      if (list === undefined) continue
      if (list instanceof HeldWrite) {
        // A write in several buckets is met once per bucket: only a request spanning buckets can meet it twice.
        if (list.offset < end && offset < list.end && (b === first || found === null || !found.includes(list))) (found ??= []).push(list)
        continue
      }
      for (const w of list) if (w.offset < end && offset < w.end && (b === first || found === null || !found.includes(w))) (found ??= []).push(w)
    }
    if (found === null) return NONE
    if (found.length > 1) found.sort((x, y) => x.seq - y.seq)
    return found
  }

  /**
   * overlapping() for a read that copies their bytes after an await: each stays readable, even
   * if it lands meanwhile, until overlayAndUnpin() or unpin().
   */
  pinForRead(offset: number, length: number): readonly HeldWrite[] {
    const found = this.overlapping(offset, length)
    for (const w of found) w.pin()
    return found
  }

  /** Copies the held bytes over `target`, which holds the device's bytes at `offset`, and unpins them. */
  overlayAndUnpin(target: Uint8Array, offset: number, writes: readonly HeldWrite[]): void {
    const end = offset + target.length
    for (const w of writes) {
      const from = Math.max(offset, w.offset)
      const to = Math.min(end, w.end)
      if (from < to) target.set(w.data.subarray(from - w.offset, to - w.offset), from - offset)
    }
    unpin(writes)
  }

  /** Resolves once every write held now has landed (later ones are not waited for). */
  drain(): Promise<void> {
    if (this.count === 0) return Promise.resolve()
    // One promise for the lot, not one per held write (up to limitBytes of 4 KiB writes).
    return new Promise((resolve) => whenAllLanded(this.list(), resolve))
  }

  /** The held writes, oldest first. */
  private list(): HeldWrite[] {
    const all: HeldWrite[] = []
    for (let w = this.oldest; w !== null; w = w.newer) all.push(w)
    return all
  }
}

/** Lets go of writes pinned by pinForRead() whose bytes are not needed after all. */
export function unpin(writes: readonly HeldWrite[]): void {
  for (const w of writes) w.unpin()
}
