/**
 * WriteCombiner: gathers small writes to one device while an earlier one is in flight, and
 * writes the neighbours among them as one request.
 *
 * First-touch copies of random 4 KiB origin writes land in consecutive COW chunks (allocation
 * is sequential), yet each used to be its own trip through the I/O thread pool, which costs more
 * than the copy itself. A write that arrives while the device is idle goes out at once, so a
 * lone writer waits no longer than before; writes that arrive meanwhile are sorted and merged
 * into runs when the in-flight ones finish (group commit for data).
 *
 * Callers must not have overlapping writes in flight at once: merged runs may be reordered.
 */
import { enginePool } from '../util/buffer-pool.js'
import type { BlockDevice, IoDone } from './block-device.js'

export interface WriteCombinerOptions {
  /** Writes larger than this go out alone, at once: merging them would only add a copy. */
  readonly maxPieceBytes?: number
  /** Largest merged write. */
  readonly maxMergedBytes?: number
}

interface Piece {
  readonly offset: number
  readonly data: Uint8Array
  readonly done: IoDone
}

export class WriteCombiner {
  readonly device: BlockDevice
  private readonly maxPieceBytes: number
  private readonly maxMergedBytes: number
  private queue: Piece[] = []
  private inFlight = 0
  private merged = 0 // device writes saved, for tests and benchmarks

  constructor(device: BlockDevice, options: WriteCombinerOptions = {}) {
    this.device = device
    this.maxPieceBytes = options.maxPieceBytes ?? 64 * 1024
    this.maxMergedBytes = options.maxMergedBytes ?? 1024 * 1024
  }

  /** How many device writes merging has saved so far. */
  get savedWrites(): number {
    return this.merged
  }

  write(data: Uint8Array, offset: number): Promise<void> {
    return new Promise((resolve, reject) => this.writeThen(data, offset, (err) => (err === null ? resolve() : reject(err))))
  }

  /** write() with a callback: a piece costs no promise (the copy engine's form). */
  writeThen(data: Uint8Array, offset: number, done: IoDone): void {
    if (data.length > this.maxPieceBytes || this.inFlight === 0) this.issue(data, offset, [{ offset, data, done }])
    else this.queue.push({ offset, data, done })
  }

  /**
   * One device write for `run`; each piece hears how it went once the queue behind it is drained.
   * `merged` is the pooled buffer the run was copied into (null: the piece's own bytes).
   */
  private issue(data: Uint8Array, offset: number, run: readonly Piece[], merged: Uint8Array | null = null): void {
    this.inFlight++
    this.device.writeThen(data, offset, false, (err) => {
      if (merged !== null) enginePool.release(merged)
      this.finished(run, err)
    })
  }

  private finished(run: readonly Piece[], err: unknown): void {
    if (--this.inFlight === 0 && this.queue.length > 0) this.drain()
    for (const p of run) p.done(err)
  }

  private drain(): void {
    const pieces = this.queue
    this.queue = []
    pieces.sort((a, b) => a.offset - b.offset)
    let from = 0
    let bytes = (pieces[0] as Piece).data.length
    for (let i = 1; i <= pieces.length; i++) {
      const prev = pieces[i - 1] as Piece
      const next = pieces[i]
      if (next && next.offset === prev.offset + prev.data.length && bytes + next.data.length <= this.maxMergedBytes) {
        bytes += next.data.length
        continue
      }
      this.writeRun(pieces.slice(from, i), bytes)
      from = i
      bytes = next ? next.data.length : 0
    }
  }

  private writeRun(run: Piece[], bytes: number): void {
    const first = run[0] as Piece
    if (run.length === 1) return this.issue(first.data, first.offset, run)
    const merged = enginePool.acquire(bytes)
    let at = 0
    for (const p of run) {
      merged.set(p.data, at)
      at += p.data.length
    }
    this.merged += run.length - 1
    this.issue(merged, first.offset, run, merged)
  }
}
