/**
 * PendingBytes: the server-wide count of bytes held for requests that are not answered yet —
 * WRITE payloads from the moment their header is read (the payload is then arriving) and READ
 * buffers — against a cap. Per-connection limits alone let many clients together hold any
 * amount; this one bound covers all of them.
 *
 * Design notes:
 * - A request is admitted while the count is below the cap, so the count stays below the cap
 *   plus one request: admission is a synchronous check-and-add on the event loop.
 * - Connections that find no room stop reading their socket and ask to be called back; every
 *   waiter is called once when releases bring the count below the cap again, and those that
 *   still find no room ask again.
 */
export class PendingBytes {
  readonly capBytes: number
  private heldBytes = 0
  private peakHeldBytes = 0
  private readonly waiters = new Set<() => void>()

  constructor(capBytes: number) {
    if (!(capBytes > 0)) throw new RangeError(`pending-bytes cap ${capBytes} must be positive`)
    this.capBytes = capBytes
  }

  /** Bytes held now. */
  get bytes(): number {
    return this.heldBytes
  }

  /** The most ever held at once. */
  get peakBytes(): number {
    return this.peakHeldBytes
  }

  /** True while another request may be admitted. */
  get hasRoom(): boolean {
    return this.heldBytes < this.capBytes
  }

  hold(bytes: number): void {
    this.heldBytes += bytes
    if (this.heldBytes > this.peakHeldBytes) this.peakHeldBytes = this.heldBytes
  }

  release(bytes: number): void {
    this.heldBytes -= bytes
    if (!this.hasRoom || this.waiters.size === 0) return
    const woken = [...this.waiters]
    this.waiters.clear()
    for (const wake of woken) wake()
  }

  /** Calls `wake` once, the next time there is room. */
  whenRoom(wake: () => void): void {
    this.waiters.add(wake)
  }

  cancel(wake: () => void): void {
    this.waiters.delete(wake)
  }
}
