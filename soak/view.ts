/**
 * One export under test (the origin `VOL` or a snapshot `VOL@SNAP`) and its model: the bytes it
 * must read as. Writes are applied to the model when they are answered; the RangeLock orders
 * conflicting requests so that every answered read can be compared with the model exactly.
 */
import type { NbdClient } from './nbd-client.js'
import { RangeLock } from './range-lock.js'

export type ViewState =
  /** Served; every request must succeed. */
  | 'live'
  /** Being removed or merged with --force: requests may now get ESHUTDOWN. */
  | 'forcing'
  /** Removed or merged: every request sent from now on must get ESHUTDOWN. */
  | 'withdrawn'

export class View {
  readonly exportName: string
  /** Null for the origin. */
  readonly snapshot: string | null
  readonly transient: boolean
  model: Uint8Array
  readonly lock = new RangeLock()
  readonly clients: NbdClient[] = []
  readonly lanes: Promise<void>[] = []
  state: ViewState = 'live'
  /** Lanes finish their current request and stop. */
  stopping = false
  private writeGate: Gate | null = null
  private readGate: Gate | null = null

  constructor(exportName: string, snapshot: string | null, model: Uint8Array, transient = false) {
    this.exportName = exportName
    this.snapshot = snapshot
    this.model = model
    this.transient = transient
  }

  get sizeBytes(): number {
    return this.model.length
  }

  /** Holds new writes back and resolves once none is in flight (reads go on). */
  async pauseWrites(): Promise<void> {
    this.writeGate ??= gate()
    await this.lock.whenNoWrites()
  }

  /** Holds every new read and write back and resolves once none is in flight. */
  async pauseAll(): Promise<void> {
    this.writeGate ??= gate()
    this.readGate ??= gate()
    await this.lock.whenIdle()
  }

  resume(): void {
    const gates = [this.writeGate, this.readGate]
    this.writeGate = null
    this.readGate = null
    for (const g of gates) g?.open()
  }

  /**
   * Null when a request of this kind may be sent now, else what to wait for before asking
   * again. Synchronous, so a caller that registers its request right after an answer of null
   * cannot slip past a pause that began meanwhile.
   */
  blocked(write: boolean): Promise<void> | null {
    return (write ? this.writeGate : this.readGate)?.promise ?? null
  }

  /** Stops the lanes (each after its request in flight) and waits for them. */
  async stopLanes(): Promise<void> {
    this.stopping = true
    this.resume()
    await Promise.all(this.lanes)
  }
}

interface Gate {
  readonly promise: Promise<void>
  readonly open: () => void
}

function gate(): Gate {
  let open!: () => void
  const promise = new Promise<void>((resolve) => {
    open = resolve
  })
  return { promise, open }
}
