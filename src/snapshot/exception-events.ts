/**
 * The global "pending exceptions done" counter (kernel: _pending_exceptions_done). Every pending
 * exception that finishes, successfully or not, in any snapshot of any origin sharing this
 * object bumps it and wakes every waiter. The merge samples the value before scanning an extent
 * and then waits for it to change, so a completion racing with the scan is never missed.
 */
export class ExceptionEvents {
  private _done = 0
  private waiters: Array<() => void> = []

  get done(): number {
    return this._done
  }

  completed(): void {
    this._done++
    if (this.waiters.length === 0) return // the usual case: no new array per completed extent
    const waiters = this.waiters
    this.waiters = []
    for (const wake of waiters) wake()
  }

  /** Resolves as soon as the counter differs from `seen` (at once if it already does). */
  waitForChange(seen: number): Promise<void> {
    if (this._done !== seen) return Promise.resolve()
    return new Promise((resolve) => this.waiters.push(resolve))
  }
}

/** The process-wide default; tests pass their own instance to isolate origins. */
export const defaultExceptionEvents = new ExceptionEvents()
