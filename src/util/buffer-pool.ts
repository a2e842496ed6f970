/**
 * Recycled buffers for the engine's short-lived copies: the old data a copy-out reads, the held
 * copy of a write-back write, a coalesced COW write. Fresh ArrayBuffers for these (even carved
 * from shared slabs) cost a page fault per 4 KiB on first touch, zeroing, and unmapping when the
 * garbage collector frees them: on first-touch writes with 4 KiB chunks, filling held copies and
 * merged COW writes was the largest item in the main thread's profile. A released buffer goes
 * back on a free list and comes out again still mapped.
 *
 * Buffers come in power-of-two classes from 512 B up; a caller gets a view of exactly the bytes
 * it asked for and must hand that same view back once nothing reads or writes it any more.
 * Requests above MAX_POOLED_BYTES get a buffer of their own, which release() ignores.
 */
const MIN_CLASS_SHIFT = 9
const MAX_POOLED_BYTES = 4 * 1024 * 1024

export class BufferPool {
  private readonly maxFreeBytes: number
  /** Free buffers per class (index: log2 of the class size minus MIN_CLASS_SHIFT). */
  private readonly free: ArrayBuffer[][] = []
  private freeBytes = 0
  /**
   * An id for every buffer of this pool, lent or free, and whether it is lent: release() of
   * anything else, or of a buffer not lent, is ignored. Ids stay with a buffer while the pool
   * has it, so a steady acquire/release cycle changes no Map (a Set of lent buffers, added to
   * and deleted from per request, rehashed often enough to be a tenth of a first-touch write's
   * garbage; a WeakSet's ephemeron table was worse).
   */
  private readonly ids = new Map<ArrayBuffer, number>()
  private lent = new Uint8Array(256)
  /**
   * By id, a view of the whole buffer, made once and handed out for every request of exactly
   * the class size (a 4 KiB write, a 4 KiB copy): a typed array object per request was the
   * largest single item of a first-touch write's garbage after the closures went.
   */
  private readonly wholeViews: Array<Uint8Array | undefined> = []
  private freeIds: number[] = []
  private nextId = 0

  constructor(options: { maxFreeBytes?: number } = {}) {
    this.maxFreeBytes = options.maxFreeBytes ?? 32 * 1024 * 1024
  }

  /** Bytes held in free buffers, ready to be handed out again. */
  get freeByteCount(): number {
    return this.freeBytes
  }

  /** A view of `bytes` bytes whose contents are undefined: the caller overwrites them in full. */
  acquire(bytes: number): Uint8Array {
    if (bytes > MAX_POOLED_BYTES) return new Uint8Array(bytes)
    const shift = classShift(bytes)
    let buffer = this.free[shift - MIN_CLASS_SHIFT]?.pop()
    let id: number
    if (buffer === undefined) {
      buffer = new ArrayBuffer(1 << shift)
      id = this.freeIds.pop() ?? this.nextId++
      if (id >= this.lent.length) {
        const grown = new Uint8Array(this.lent.length * 2)
        grown.set(this.lent)
        this.lent = grown
      }
      this.ids.set(buffer, id)
    } else {
      this.freeBytes -= buffer.byteLength
      id = this.ids.get(buffer) as number
    }
    this.lent[id] = 1
    if (bytes !== buffer.byteLength) return new Uint8Array(buffer, 0, bytes)
    return (this.wholeViews[id] ??= new Uint8Array(buffer))
  }

  /**
   * Takes back a view from acquire(); nothing may use it afterwards (a later acquire may hand
   * out the same view object again). Views it did not hand out, and a second release of the
   * same one, are ignored.
   */
  release(view: Uint8Array): void {
    const buffer = view.buffer as ArrayBuffer
    const id = this.ids.get(buffer)
    if (id === undefined || this.lent[id] === 0) return
    this.lent[id] = 0
    // Past the cap the buffer is left to the garbage collector.
    if (this.freeBytes + buffer.byteLength > this.maxFreeBytes) return this.forget(buffer, id)
    ;(this.free[classShift(buffer.byteLength) - MIN_CLASS_SHIFT] ??= []).push(buffer)
    this.freeBytes += buffer.byteLength
  }

  /** Lets the garbage collector have every free buffer (e.g. when the engine goes idle). */
  trim(): void {
    for (const list of this.free) if (list) for (const buffer of list) this.forget(buffer, this.ids.get(buffer) as number)
    this.free.length = 0
    this.freeBytes = 0
  }

  /** The pool lets go of `buffer` (not lent): its id is free for a new buffer. */
  private forget(buffer: ArrayBuffer, id: number): void {
    this.ids.delete(buffer)
    this.wholeViews[id] = undefined
    this.freeIds.push(id)
  }
}

function classShift(bytes: number): number {
  return Math.max(MIN_CLASS_SHIFT, 32 - Math.clz32(Math.max(1, bytes) - 1))
}

/** The pool the engine's copies share. */
export const enginePool = new BufferPool()
