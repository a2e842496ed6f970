/**
 * InlineIo: whether a local file's next read or write runs on the calling thread (a blocking
 * pread/pwrite) instead of libuv's thread pool. FileDevice keeps one policy for its reads and one
 * for its writes.
 *
 * On the PVM guests we run on, a hop to the pool costs more than a request that the page cache
 * serves: the pool thread's system call, futex wake-ups, an eventfd round and the completion
 * callback, ~6 µs of CPU per 4 KiB request plus the main thread's share, where a blocking pread(2)
 * of a cached page costs ~3.5 µs in all. Measured over NBD with no snapshot, alternating with
 * the pool-only build: inline 4 KiB reads took the server from 20-21 to 16.5-17.5 µs of CPU per
 * read; inline writes took 4 KiB random writes from 40.7-46.2k to 53.9-56.3k IOPS and 1 MiB
 * sequential writes from 3547-3649 to 3926-3979 MiB/s (server CPU per MiB ~250 → ~220 µs: the copy
 * into the page cache is the same either way, the wake-ups are not). A COW's writes stay on the
 * pool (POOL_ONLY_PROFILE below).
 *
 * A blocking call is only cheap while the file behaves like memory. A read that goes to the disk
 * (83 µs per 4 KiB random read here, milliseconds on a busy disk), or a write the kernel holds back
 * because too much of the page cache is dirty (balance_dirty_pages sleeps up to 200 ms), must not
 * hold the event loop. Two signals say the file is not behaving like memory, and either sends the
 * following requests to the pool:
 * - a request slower than its profile's limit (a base plus a time per byte);
 * - the process's block input count (getrusage's ru_inblock) rising across a window of inline
 *   requests: some of them were served by the disk, however fast it was (a write of part of a page
 *   that is not cached reads it first). The count is the process's, so the pool's own reads of
 *   cold data count too; that only keeps requests in the pool while anything here reads from
 *   the disk, which is where they belong then.
 * After a slow signal the policy sends a run of requests to the pool, then probes inline again;
 * the run doubles (up to a cap) each time the probe is slow too, so on a cold or throttled file
 * the blocking requests are a small share. The run is counted in bytes, not requests, so it means
 * the same whatever the sizes: counted in requests, 5 s of 4 KiB random writes over NBD gave 11
 * slow signals here (a main thread preempted for a millisecond reads as slow) and left a backoff
 * of 65,536 requests, which the 1 MiB writes that came next would spend on the pool: 64 GiB.
 *
 * A turn of the event loop runs a budget inline (bytes for reads, requests for writes), so a
 * burst of requests issued at once keeps the pool thread busy beside the main thread: a client's
 * 1 MiB read of a snapshot becomes dozens of short COW and origin reads (blocking on each in turn,
 * 920-975 vs 1093-1538 MiB/s), and a first-touch commit lands a batch of origin writes and
 * coalesced COW writes (blocking on every one made first-touch 4 KiB writes with a snapshot
 * slower, 24-27k against 25-30k IOPS with none inline). The first request of a turn may run inline
 * whatever its size.
 *
 * Ordering is not at stake: the device contract orders no two requests in flight at once, and
 * with a pool of several threads the engine already sees requests complete in any order.
 */

/** When a request may run inline and when it counts as slow. */
export interface InlineIoProfile {
  /** Requests above this size always go to the pool. */
  readonly maxBytes: number
  /** Inline bytes per event-loop turn; past it, the turn's later requests go to the pool. */
  readonly bytesPerTurn: number
  /** Inline requests per event-loop turn; past it, the turn's later requests go to the pool. */
  readonly opsPerTurn: number
  /** An inline request slower than slowBaseMs + its bytes / slowBytesPerMs is a slow signal. */
  readonly slowBaseMs: number
  readonly slowBytesPerMs: number
}

/** Reads above 64 KiB go to the pool: their copy is long enough to overlap with the main thread's work. */
export const INLINE_READ_MAX_BYTES = 64 * 1024
/** An inline read slower than this sends the following ones to the pool. */
export const SLOW_READ_MS = 0.25
/** 32 requests of 4 KiB, a QD32 burst, fit. */
export const READ_BYTES_PER_TURN = 256 * 1024
export const READ_PROFILE: InlineIoProfile = {
  maxBytes: INLINE_READ_MAX_BYTES,
  bytesPerTurn: READ_BYTES_PER_TURN,
  opsPerTurn: Infinity,
  slowBaseMs: SLOW_READ_MS,
  slowBytesPerMs: Infinity,
}

/**
 * Eight writes per turn, whatever their size. Bytes are the wrong measure here: the hop saved is
 * per request, and a 64 KiB budget sent most 1 MiB writes to the pool (1 MiB sequential writes
 * 3667-3728 MiB/s with it, 3886-4138 with four or eight writes a turn, 4006-4159 with no budget;
 * 4 KiB random writes with no snapshot 52-54k, 54-58k and 55-60k IOPS; first-touch 4 KiB writes
 * with one snapshot 26-29k, 24-27k and 24-27k, in runs that noisy, against 25-30k with none
 * inline). Without any budget they were 10-15 % slower than with none inline.
 */
export const WRITE_OPS_PER_TURN = 8
export const SLOW_WRITE_MS = 0.25
/**
 * 1 GiB/s: a page-cache write copies at several GiB/s here (a 1 MiB write ~0.1 ms), so a 1 MiB
 * write is slow past ~1.25 ms, far below a dirty-page throttle's sleep.
 */
export const SLOW_WRITE_BYTES_PER_MS = 1024 * 1024
export const WRITE_PROFILE: InlineIoProfile = {
  maxBytes: Infinity,
  bytesPerTurn: Infinity,
  opsPerTurn: WRITE_OPS_PER_TURN,
  slowBaseMs: SLOW_WRITE_MS,
  slowBytesPerMs: SLOW_WRITE_BYTES_PER_MS,
}

/**
 * Every request to the pool: for a device whose writes go through the copy engine's
 * WriteCombiner (a COW), which merges the writes that arrive while one is in flight; a blocking
 * write never is, so inline COW writes went out one by one (first-touch 4 KiB writes with one
 * snapshot 24.9-26.2k IOPS with them, 26.4-28.2k with the COW's writes on the pool, alternated).
 */
export const POOL_ONLY_PROFILE: InlineIoProfile = {
  maxBytes: -1,
  bytesPerTurn: 0,
  opsPerTurn: 0,
  slowBaseMs: 0,
  slowBytesPerMs: Infinity,
}

/** Inline requests between two looks at the block input count. */
export const WINDOW_OPS = 16
/** Bytes of requests sent to the pool after a first slow signal: 256 requests of 4 KiB. */
export const FIRST_BACKOFF_BYTES = 1024 * 1024
/** The most the backoff grows to: 65,536 requests of 4 KiB, 256 of 1 MiB. */
export const MAX_BACKOFF_BYTES = 256 * 1024 * 1024

export interface InlineIoOptions {
  /** Milliseconds (tests pass their own clock). */
  readonly now?: () => number
  /** Blocks this process has read from storage so far (getrusage ru_inblock). */
  readonly blocksRead?: () => number
  /** Calls its argument at the end of this event-loop turn (tests pass their own). */
  readonly atTurnEnd?: (fn: () => void) => void
}

export class InlineIo {
  readonly profile: InlineIoProfile
  /** Bytes of pool requests still to go before the next inline probe. */
  private poolLeftBytes = 0
  private backoffBytes = FIRST_BACKOFF_BYTES
  private windowLeft = 0
  private blocksAtWindowStart = 0
  private slowCount = 0
  /** Bytes and requests run inline in this event-loop turn. */
  private turnBytes = 0
  private turnOps = 0
  /** Size of the inline request under way (for its slow limit). */
  private currentBytes = 0
  readonly now: () => number
  private readonly blocksRead: () => number
  private readonly atTurnEnd: (fn: () => void) => void
  private readonly turnEnded = (): void => {
    this.turnBytes = 0
    this.turnOps = 0
  }

  constructor(profile: InlineIoProfile, options: InlineIoOptions = {}) {
    this.profile = profile
    this.now = options.now ?? (() => performance.now())
    this.blocksRead = options.blocksRead ?? (() => process.resourceUsage().fsRead)
    this.atTurnEnd = options.atTurnEnd ?? setImmediate
  }

  static reads(options: InlineIoOptions = {}): InlineIo {
    return new InlineIo(READ_PROFILE, options)
  }

  static writes(options: InlineIoOptions = {}): InlineIo {
    return new InlineIo(WRITE_PROFILE, options)
  }

  static poolOnly(): InlineIo {
    return new InlineIo(POOL_ONLY_PROFILE)
  }

  /** Times inline requests were found slow (tests, diagnostics). */
  get slowSignals(): number {
    return this.slowCount
  }

  /** Whether a request of `lengthBytes` runs inline now; if so, `ended` must follow it. */
  mayInline(lengthBytes: number): boolean {
    if (lengthBytes > this.profile.maxBytes) return false
    if (this.poolLeftBytes > 0) {
      this.poolLeftBytes -= lengthBytes
      return false
    }
    if (this.turnOps > 0 && (this.turnOps >= this.profile.opsPerTurn || this.turnBytes + lengthBytes > this.profile.bytesPerTurn)) return false
    if (this.turnOps === 0) this.atTurnEnd(this.turnEnded)
    this.turnBytes += lengthBytes
    this.turnOps++
    this.currentBytes = lengthBytes
    if (this.windowLeft === 0) {
      this.windowLeft = WINDOW_OPS
      this.blocksAtWindowStart = this.blocksRead()
    }
    return true
  }

  /** The inline request took `elapsedMs`. */
  ended(elapsedMs: number): void {
    if (elapsedMs > this.profile.slowBaseMs + this.currentBytes / this.profile.slowBytesPerMs) return this.slow()
    if (--this.windowLeft > 0) return
    const blocks = this.blocksRead()
    if (blocks > this.blocksAtWindowStart) return this.slow()
    // The next window starts here: one look at the count per window.
    this.blocksAtWindowStart = blocks
    this.windowLeft = WINDOW_OPS
    this.backoffBytes = FIRST_BACKOFF_BYTES
  }

  private slow(): void {
    this.slowCount++
    this.windowLeft = 0
    this.poolLeftBytes = this.backoffBytes
    this.backoffBytes = Math.min(MAX_BACKOFF_BYTES, this.backoffBytes * 2)
  }
}
