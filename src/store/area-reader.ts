/**
 * AreaReader: the metadata areas of a persistent COW, in table order, for the open.
 *
 * Areas sit a chunk stride apart (1 MiB with 4 KiB chunks), so each is its own read, and a table
 * of 10^7 exceptions has some 40,000 of them. Asynchronous reads cost a thread-pool hop, a wake-up
 * and a promise each: on the PVM guests we run on, 256 areas read that way (16 in flight) took
 * 19-28 ms of a 38 ms volume open, against 6-7 ms read with blocking pread(2) from the page cache.
 * So the reader starts with blocking reads where the device has them (local files) and times
 * them: a COW that is not in the page cache (a cold open from disk) must not hold the event loop,
 * so once a batch averages more than SLOW_READ_MS per area, the rest are read asynchronously, 16
 * ahead. The first batch is two areas, so a cold disk blocks the loop for two reads at most;
 * between batches the reader yields to the event loop, so other volumes' requests go on.
 */
import type { BlockDevice } from '../device/block-device.js'
import { type Layout, areaChunk } from '../format/layout.js'

/** Average blocking read per area above which the reader switches to asynchronous reads. */
export const SLOW_READ_MS = 0.1
const FIRST_BATCH_AREAS = 2
const BATCH_AREAS = 64

export interface AreaReaderOptions {
  readonly cow: BlockDevice
  readonly layout: Layout
  /** Reads never go past this chunk. */
  readonly cowChunks: number
  /** The store's asynchronous read. */
  readonly read: (offset: number, length: number) => Promise<Uint8Array>
  /** The store's wording for a failed read (it names COW metadata). */
  readonly describeError: (err: unknown, offset: number, length: number) => unknown
  /** No read-ahead reaches this area (default: none). */
  readonly endArea?: number
  /** Milliseconds, for timing blocking reads (tests pass their own clock). */
  readonly now?: () => number
}

export class AreaReader {
  private blocking = true
  private batchAreas = FIRST_BATCH_AREAS
  private batchDone = 0
  private batchReadMs = 0
  private readonly ahead: Array<Promise<Uint8Array>> = []
  /** The next area whose asynchronous read is not issued yet. */
  private queued = 0
  private inFlight = 0
  private idle: (() => void) | null = null
  private readonly readAhead: number
  private readonly options: AreaReaderOptions

  constructor(options: AreaReaderOptions) {
    this.options = options
    // 16 areas in flight (at most 4 MiB for big chunks): measured no faster with 64
    this.readAhead = Math.max(1, Math.min(16, Math.floor((4 * 1024 * 1024) / options.layout.chunkBytes)))
  }

  /** Whether the areas so far came from blocking reads (tests, benchmarks). */
  get readsBlocking(): boolean {
    return this.blocking
  }

  /** Area `k`'s image; callers ask for areas in ascending order (gaps allowed), each inside the device. */
  async next(k: number): Promise<Uint8Array> {
    if (this.blocking && this.batchDone === this.batchAreas) {
      if (this.batchReadMs / this.batchDone > SLOW_READ_MS) this.blocking = false
      else await new Promise<void>((resolve) => setImmediate(resolve))
      this.batchAreas = BATCH_AREAS
      this.batchDone = 0
      this.batchReadMs = 0
    }
    if (this.blocking) {
      const { cow, layout, now = performance.now.bind(performance) } = this.options
      const { chunkBytes } = layout
      const image = new Uint8Array(chunkBytes)
      const offset = areaChunk(layout, k) * chunkBytes
      const started = now()
      let done: boolean
      try {
        done = cow.readIntoNow(image, offset)
      } catch (err) {
        throw this.options.describeError(err, offset, chunkBytes)
      }
      if (done) {
        this.batchReadMs += now() - started
        this.batchDone++
        return image
      }
      this.blocking = false
    }
    // Read-aheads of areas the caller skipped are dropped.
    while (this.queued > k && this.ahead.length > this.queued - k) this.ahead.shift()
    if (this.queued < k) {
      this.ahead.length = 0
      this.queued = k
    }
    // Only areas inside the device are read ahead; reads past the terminator are simply dropped.
    const { layout, cowChunks, read: readAsync, endArea = Number.MAX_SAFE_INTEGER } = this.options
    const end = Math.min(k + this.readAhead, Math.max(k + 1, endArea))
    while (this.queued < end && areaChunk(layout, this.queued) < cowChunks) {
      const read = readAsync(areaChunk(layout, this.queued) * layout.chunkBytes, layout.chunkBytes)
      this.inFlight++
      // A read-ahead past the last area may fail unobserved.
      read.then(this.readEnded, this.readEnded)
      this.ahead.push(read)
      this.queued++
    }
    return this.ahead.shift() as Promise<Uint8Array>
  }

  private readonly readEnded = (): void => {
    if (--this.inFlight === 0) this.idle?.()
  }

  /** Waits for the reads still in flight: nothing may touch the device behind the caller's back. */
  async settle(): Promise<void> {
    while (this.inFlight > 0) await new Promise<void>((resolve) => (this.idle = resolve))
  }
}
