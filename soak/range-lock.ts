/**
 * First-come ordering of conflicting requests on one view: a write waits for every earlier
 * request overlapping it, a read for every earlier overlapping write. Requests that do not
 * conflict run concurrently. This is what makes the model exact with 16 connections in flight:
 * when a read completes, the bytes it covers are exactly the model's (every earlier write to
 * them has been answered and applied, no later one has been sent).
 */
export interface Lease {
  readonly start: number
  readonly end: number
  readonly write: boolean
}

interface Entry extends Lease {
  ready: boolean
  wake: (() => void) | null
}

export class RangeLock {
  private entries: Entry[] = []
  private writeCount = 0
  private waiters: { readonly writesOnly: boolean; readonly resolve: () => void }[] = []

  /** Resolves once every earlier conflicting request has been released. */
  async acquire(start: number, end: number, write: boolean): Promise<Lease> {
    const entry: Entry = { start, end, write, ready: false, wake: null }
    entry.ready = !this.entries.some((e) => conflicts(e, entry))
    this.entries.push(entry)
    if (write) this.writeCount++
    if (!entry.ready) {
      await new Promise<void>((resolve) => {
        entry.wake = resolve
      })
    }
    return entry
  }

  release(lease: Lease): void {
    const i = this.entries.indexOf(lease as Entry)
    if (i === -1) throw new Error('RangeLock: release of a lease not held')
    this.entries.splice(i, 1)
    if (lease.write) this.writeCount--
    if (this.writeCount === 0 && this.waiters.length > 0) {
      const idle = this.entries.length === 0
      const woken = this.waiters.filter((w) => w.writesOnly || idle)
      this.waiters = this.waiters.filter((w) => !woken.includes(w))
      for (const w of woken) w.resolve()
    }
    for (let j = 0; j < this.entries.length; j++) {
      const e = this.entries[j] as Entry
      if (e.ready) continue
      if (!this.entries.slice(0, j).some((earlier) => conflicts(earlier, e))) {
        e.ready = true
        e.wake?.()
      }
    }
  }

  /** Resolves when no write is registered (held or waiting). */
  whenNoWrites(): Promise<void> {
    if (this.writeCount === 0) return Promise.resolve()
    return new Promise((resolve) => this.waiters.push({ writesOnly: true, resolve }))
  }

  /** Resolves when nothing is registered. */
  whenIdle(): Promise<void> {
    if (this.entries.length === 0) return Promise.resolve()
    return new Promise((resolve) => this.waiters.push({ writesOnly: false, resolve }))
  }
}

function conflicts(a: Lease, b: Lease): boolean {
  return (a.write || b.write) && a.start < b.end && b.start < a.end
}
