/**
 * Time as the merge's rate limiter and the NBD server's handshake limit see it. Injectable, so a
 * test can step time exactly instead of sleeping and measuring the wall clock.
 */
export interface Clock {
  /** Milliseconds on a monotonic scale; only differences mean anything. */
  now(): number
  /**
   * Calls `fn` once, `ms` from now; the returned function cancels it (safe to call more than
   * once, or after it ran). With `unref`, a pending timer does not keep the process alive.
   */
  setTimer(ms: number, fn: () => void, options?: { readonly unref?: boolean }): () => void
}

export const systemClock: Clock = {
  now: () => performance.now(),
  setTimer(ms, fn, options) {
    const timer = setTimeout(fn, ms)
    if (options?.unref === true) timer.unref()
    return () => clearTimeout(timer)
  },
}
