/**
 * A Clock whose time moves only when the test says so: the rate limiter's and the handshake
 * limit's arithmetic can then be checked exactly, with no sleeping and no verdict that depends
 * on how loaded the machine is.
 */
import type { Clock } from '../../src/util/clock.js'

interface Timer {
  readonly dueMs: number
  readonly serial: number
  readonly fn: () => void
}

export class ManualClock implements Clock {
  private timeMs: number
  private serial = 0
  private timers: Timer[] = []
  private waiters: Array<() => void> = []

  constructor(startMs = 0) {
    this.timeMs = startMs
  }

  now(): number {
    return this.timeMs
  }

  setTimer(ms: number, fn: () => void): () => void {
    const timer: Timer = { dueMs: this.timeMs + Math.max(0, ms), serial: this.serial++, fn }
    this.timers.push(timer)
    const waiters = this.waiters
    this.waiters = []
    for (const wake of waiters) wake()
    return () => {
      this.timers = this.timers.filter((t) => t !== timer)
    }
  }

  /** Timers set and neither run nor cancelled. */
  get pending(): number {
    return this.timers.length
  }

  /** When the earliest pending timer falls due, or null when none is pending. */
  nextDueMs(): number | null {
    const next = this.earliest()
    return next ? next.dueMs : null
  }

  /** Resolves once a timer is pending (at once if one is). */
  whenPending(): Promise<void> {
    if (this.timers.length > 0) return Promise.resolve()
    return new Promise((resolve) => this.waiters.push(resolve))
  }

  /** Moves time forward by `ms`, running every timer that falls due on the way, in due order. */
  advance(ms: number): void {
    if (!(ms >= 0)) throw new RangeError(`ManualClock.advance: bad step ${ms}`)
    const target = this.timeMs + ms
    for (let next = this.earliest(); next && next.dueMs <= target; next = this.earliest()) this.fire(next)
    this.timeMs = target
  }

  /** Moves time to the earliest pending timer and runs it; false when none is pending. */
  advanceToNext(): boolean {
    const next = this.earliest()
    if (!next) return false
    this.fire(next)
    return true
  }

  private earliest(): Timer | undefined {
    let best: Timer | undefined
    for (const t of this.timers) if (!best || t.dueMs < best.dueMs || (t.dueMs === best.dueMs && t.serial < best.serial)) best = t
    return best
  }

  private fire(timer: Timer): void {
    this.timers = this.timers.filter((t) => t !== timer)
    this.timeMs = Math.max(this.timeMs, timer.dueMs)
    timer.fn()
  }
}
