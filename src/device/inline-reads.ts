/**
 * InlineReads: whether a local file's next small read runs on the calling thread.
 *
 * On the PVM guests we run on, handing a 4 KiB read to libuv's thread pool costs more than the
 * read: the pool thread's pread, futex wake-ups, an eventfd round and the completion callback,
 * ~6 µs of CPU on the pool thread plus the main thread's share, where a blocking pread(2) of a
 * cached page costs ~3.5 µs in all (fs.readSync included). Serving no-snapshot 4K random reads
 * over NBD that hop was a quarter of the server's CPU per request (20-21 vs 16.5-17.5 µs measured).
 *
 * A blocking read is only cheap while the data is in the page cache; a read that goes to the
 * disk (83 µs per 4 KiB random read here, milliseconds on a busy disk) must not hold the event
 * loop, and at queue depth 32 it would serialise what the disk could do in parallel. Two signals
 * say a file is not behaving like memory, and either sends the following reads to the pool:
 * - a read slower than SLOW_READ_MS (a busy disk, a network file system);
 * - the process's block input count (getrusage's ru_inblock) rising across a window of inline
 *   reads: some of them were served by the disk, however fast it was. The count is the
 *   process's, so the pool's own reads of cold data count too; that only keeps reads in the pool
 *   while anything here reads from the disk, which is where they belong then.
 * A turn of the event loop reads at most INLINE_BYTES_PER_TURN inline, so a request split into
 * many pieces (a snapshot read) keeps the pool thread busy beside the main thread.
 * After a slow signal the policy sends a run of reads to the pool, then probes inline again; the
 * run doubles (up to a cap) each time the probe is slow too, so on a cold file the blocking
 * reads are a small share. Writes always go to the pool: measured, blocking writes made
 * first-touch writes slower (the COW write combiner merges only the writes that arrive while one
 * is in flight, and blocking ones are never in flight).
 *
 * Ordering is not at stake: the device contract orders no two requests in flight at once, and
 * with a pool of several threads the engine already sees reads complete in any order.
 */

/** Reads above this size always go to the pool (their copy is long enough to overlap). */
export const INLINE_MAX_BYTES = 64 * 1024
/** An inline read slower than this sends the following ones to the pool. */
export const SLOW_READ_MS = 0.25
/** Inline reads between two looks at the block input count. */
export const WINDOW_READS = 16
/**
 * Inline bytes per event-loop turn; the reads past it in the same turn go to the pool. A client's
 * 1 MiB read of a snapshot becomes dozens of short reads of the COW and the origin issued in one
 * go: blocking on each in turn made the main thread do all of them while the pool thread sat
 * idle (snapshot 1 MiB reads 920-975 vs 1093-1538 MiB/s before inline reads). 32 requests of
 * 4 KiB, a QD32 burst, fit.
 */
export const INLINE_BYTES_PER_TURN = 256 * 1024
export const FIRST_BACKOFF_READS = 256
export const MAX_BACKOFF_READS = 65536

export interface InlineReadsOptions {
  /** Milliseconds (tests pass their own clock). */
  readonly now?: () => number
  /** Blocks this process has read from storage so far (getrusage ru_inblock). */
  readonly blocksRead?: () => number
  /** Calls its argument at the end of this event-loop turn (tests pass their own). */
  readonly atTurnEnd?: (fn: () => void) => void
}

export class InlineReads {
  /** Pool reads still to go before the next inline probe. */
  private poolLeft = 0
  private backoffReads = FIRST_BACKOFF_READS
  private windowLeft = 0
  private blocksAtWindowStart = 0
  private slowCount = 0
  /** Bytes read inline in this event-loop turn. */
  private turnBytes = 0
  readonly now: () => number
  private readonly blocksRead: () => number
  private readonly atTurnEnd: (fn: () => void) => void
  private readonly turnEnded = (): void => {
    this.turnBytes = 0
  }

  constructor(options: InlineReadsOptions = {}) {
    this.now = options.now ?? (() => performance.now())
    this.blocksRead = options.blocksRead ?? (() => process.resourceUsage().fsRead)
    this.atTurnEnd = options.atTurnEnd ?? setImmediate
  }

  /** Times inline reads were found slow (tests, diagnostics). */
  get slowSignals(): number {
    return this.slowCount
  }

  /** Whether a read of `lengthBytes` runs inline now; if so, `ended` must follow it. */
  mayInline(lengthBytes: number): boolean {
    if (lengthBytes > INLINE_MAX_BYTES) return false
    if (this.poolLeft > 0) {
      this.poolLeft--
      return false
    }
    if (this.turnBytes + lengthBytes > INLINE_BYTES_PER_TURN) return false
    if (this.turnBytes === 0) this.atTurnEnd(this.turnEnded)
    this.turnBytes += lengthBytes
    if (this.windowLeft === 0) {
      this.windowLeft = WINDOW_READS
      this.blocksAtWindowStart = this.blocksRead()
    }
    return true
  }

  /** An inline read took `elapsedMs`. */
  ended(elapsedMs: number): void {
    if (elapsedMs > SLOW_READ_MS) return this.slow()
    if (--this.windowLeft > 0) return
    const blocks = this.blocksRead()
    if (blocks > this.blocksAtWindowStart) return this.slow()
    // The next window starts here: one look at the count per window.
    this.blocksAtWindowStart = blocks
    this.windowLeft = WINDOW_READS
    this.backoffReads = FIRST_BACKOFF_READS
  }

  private slow(): void {
    this.slowCount++
    this.windowLeft = 0
    this.poolLeft = this.backoffReads
    this.backoffReads = Math.min(MAX_BACKOFF_READS, this.backoffReads * 2)
  }
}
