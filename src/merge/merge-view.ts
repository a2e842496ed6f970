/**
 * MergeView: the origin's I/O while a snapshot is being merged into it (the kernel's
 * `snapshot_merge_map`, reference §8.2). Installed as `origin.interceptor`.
 *
 * A step covers a set of chunk ranges (several runs of table entries merged together), its
 * window. Mapping, per chunk c of the merging snapshot:
 * - read, c not merged yet (the merging snapshot still has an exception for it, including c in
 *   the current step) → the snapshot's COW; never blocked.
 * - read, c merged or never changed → the origin device.
 * - write, c not merged yet and outside the current step → the COW, tracked in `trackedWrites`
 *   (one write and one tracked range per run of such chunks consecutive in the COW);
 *   the step that later merges c waits for those writes first (§8.4 step 6).
 * - write, c inside a step's window → held; once that step has committed it goes DIRECTLY to
 *   the origin device (the other snapshots saved the chunk during the step's relocation).
 *   If the step fails, the held write rejects with SNAP_MERGE_FAILED. Several windows can be
 *   open at once (one step copying while the ones before it commit); each releases its own writes.
 * - write, c merged or never changed → origin.writeThroughCow (copy-on-write into the other
 *   snapshots, then the origin device).
 * - flush → origin device and COW.
 * - discard → handled as a write of zeros on the same paths. The kernel completes discards on
 *   the merge device as a no-op (or refuses them); silently keeping the data would break the
 *   BlockDevice contract ("after discard the range reads as zeros"), and passing a discard down
 *   to the origin device would skip the COW into the other snapshots. Zeros keep every path
 *   above correct at the price of writing instead of freeing space.
 * - an invalid merging snapshot: everything behaves as a plain origin (§8.2 `to_origin`).
 *
 * Routing decisions for all pieces of one request are made synchronously before the first
 * await, so publishing a step window (synchronous too) cleanly splits writes into "tracked
 * before the window" (waited for) and "held" — the kernel's exclusive section.
 */
import { SnapError } from '../errors.js'
import { RangeTracker } from '../snapshot/range-tracker.js'
import { firstEndingAfter } from '../snapshot/extent-list.js'
import type { Origin, OriginInterceptor } from '../snapshot/origin.js'
import { type Snapshot, settleAll } from '../snapshot/snapshot.js'
import { type Deferred, deferred } from '../util/deferred.js'

/** Largest zero buffer a discard allocates at once. */
const DISCARD_PIECE_BYTES = 1024 * 1024

/** Consecutive origin chunks (merging snapshot's chunk size). */
export interface ChunkRange {
  readonly firstChunk: number
  readonly count: number
}

export interface MergeWindow {
  /** The step's ranges, in table order from the end (newest entries first); disjoint. */
  readonly ranges: readonly ChunkRange[]
  /** Chunks in all ranges. */
  readonly count: number
}

export class MergeView implements OriginInterceptor {
  readonly origin: Origin
  readonly snapshot: Snapshot
  /** Writes remapped to the COW while in flight, as chunk ranges. */
  readonly trackedWrites = new RangeTracker()
  /** The merge currently driving this view (a restarted merge replaces it). */
  owner: unknown = null
  /** Writes held for a step / remapped to the COW since the view was installed. */
  readonly counters = { heldWrites: 0, remappedWrites: 0 }
  /** Open windows (one per step in flight: a few), oldest first, each with the writes it holds. */
  private windows: Array<{ window: MergeWindow; sorted: readonly ChunkRange[]; held: Array<Deferred<void>> }> = []
  private inflight = 0
  private idleWaiters: Array<() => void> = []

  constructor(origin: Origin, snapshot: Snapshot) {
    this.origin = origin
    this.snapshot = snapshot
  }

  /** The newest open window (the step being copied), or null between steps. */
  get window(): MergeWindow | null {
    return this.windows.at(-1)?.window ?? null
  }

  /** Writes waiting for a step. */
  get heldCount(): number {
    let n = 0
    for (const w of this.windows) n += w.held.length
    return n
  }

  /** Starts holding writes to every chunk of `ranges`. Synchronous on purpose. */
  publishWindow(ranges: readonly ChunkRange[]): MergeWindow {
    let count = 0
    for (const r of ranges) count += r.count
    const window = { ranges: ranges.map((r) => ({ firstChunk: r.firstChunk, count: r.count })), count }
    const sorted = window.ranges.slice().sort((a, b) => a.firstChunk - b.firstChunk)
    this.windows.push({ window, sorted, held: [] })
    return window
  }

  /** Ends a step: its held writes proceed to the origin device, or fail with `error`. */
  releaseWindow(window: MergeWindow, error?: Error): void {
    const at = this.windows.findIndex((w) => w.window === window)
    if (at === -1) return
    const { held } = this.windows.splice(at, 1)[0] as { held: Array<Deferred<void>> }
    for (const d of held) {
      if (error) d.reject(error)
      else d.resolve()
    }
  }

  /**
   * How chunks from `chunk` (up to `endChunk`) are routed by the open windows: the held-write
   * list of the window covering `chunk` (null when none does), and where that stops being true
   * — the end of the covering range, or the start of the next window range. Binary searches of
   * each window's disjoint ranges.
   */
  private windowSpan(chunk: number, endChunk: number): { readonly held: Array<Deferred<void>> | null; readonly end: number } {
    let end = endChunk
    for (const w of this.windows) {
      const sorted = w.sorted
      const r = sorted[firstEndingAfter(sorted, chunk)]
      if (r === undefined) continue
      if (r.firstChunk <= chunk) return { held: w.held, end: Math.min(endChunk, r.firstChunk + r.count) }
      end = Math.min(end, r.firstChunk)
    }
    return { held: null, end }
  }

  /** COW chunk of origin chunk `chunk` while it is unmerged, else -1. */
  private unmerged(chunk: number): number {
    if (!this.snapshot.valid) return -1
    return this.snapshot.table.lookup(chunk)
  }

  /**
   * Resolves once no request that entered this view is still running. The merge calls it after
   * uninstalling the view, before it closes the snapshot's COW under a slow read or flush.
   */
  async drain(): Promise<void> {
    while (this.inflight > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve))
  }

  private async counted(fn: () => Promise<void>): Promise<void> {
    this.inflight++
    try {
      await fn()
    } finally {
      if (--this.inflight === 0 && this.idleWaiters.length > 0) {
        const waiters = this.idleWaiters
        this.idleWaiters = []
        for (const wake of waiters) wake()
      }
    }
  }

  readInto(target: Uint8Array, offset: number): Promise<void> {
    return this.counted(() => this.mappedRead(target, offset))
  }

  write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return this.counted(() => this.mappedWrite(data, offset, fua))
  }

  flush(): Promise<void> {
    return this.counted(() => settleAll([this.origin.device.flush(), this.snapshot.store.cow.flush()]))
  }

  discard(offset: number, length: number): Promise<void> {
    return this.counted(async () => {
      const end = offset + length
      for (let pos = offset; pos < end; pos += DISCARD_PIECE_BYTES) {
        await this.mappedWrite(new Uint8Array(Math.min(DISCARD_PIECE_BYTES, end - pos)), pos, false)
      }
    })
  }

  private async mappedRead(target: Uint8Array, offset: number): Promise<void> {
    const cb = this.snapshot.chunkBytes
    const cow = this.snapshot.store.cow
    const device = this.origin.device
    const end = offset + target.length
    const jobs: Array<Promise<void>> = []
    let pos = offset
    while (pos < end) {
      const chunk = Math.floor(pos / cb)
      const newChunk = this.unmerged(chunk)
      let runEnd = Math.min(end, (chunk + 1) * cb)
      let next = chunk + 1
      if (newChunk !== -1) {
        while (runEnd < end && this.unmerged(next) === newChunk + (next - chunk)) {
          runEnd = Math.min(end, (next + 1) * cb)
          next++
        }
        jobs.push(cow.readInto(target.subarray(pos - offset, runEnd - offset), newChunk * cb + (pos - chunk * cb)))
      } else {
        while (runEnd < end && this.unmerged(next) === -1) {
          runEnd = Math.min(end, (next + 1) * cb)
          next++
        }
        jobs.push(device.readInto(target.subarray(pos - offset, runEnd - offset), pos))
      }
      pos = runEnd
    }
    await settleAll(jobs)
  }

  /**
   * One write per run: a run of merged (or never changed) chunks goes through the origin's
   * copy-on-write path; a run of unmerged chunks consecutive in the COW with one routing (held
   * by the same window, or outside every window) is one held write or one COW write, tracked
   * as one range.
   */
  private async mappedWrite(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    const cb = this.snapshot.chunkBytes
    const cow = this.snapshot.store.cow
    const device = this.origin.device
    const end = offset + data.length
    const endChunk = Math.floor((end - 1) / cb) + 1
    const jobs: Array<Promise<void>> = []
    let pos = offset
    while (pos < end) {
      const chunk = Math.floor(pos / cb)
      const newChunk = this.unmerged(chunk)
      if (newChunk === -1) {
        let runEnd = Math.min(end, (chunk + 1) * cb)
        let next = chunk + 1
        while (runEnd < end && this.unmerged(next) === -1) {
          runEnd = Math.min(end, (next + 1) * cb)
          next++
        }
        jobs.push(this.origin.writeThroughCow(data.subarray(pos - offset, runEnd - offset), pos, fua))
        pos = runEnd
        continue
      }
      const run = this.snapshot.table.mappedRun(chunk, endChunk) as { readonly cow: number; readonly count: number }
      const span = this.windowSpan(chunk, chunk + run.count)
      const runEnd = Math.min(end, span.end * cb)
      const piece = data.subarray(pos - offset, runEnd - offset)
      const at = pos
      if (span.held) {
        const d = deferred<void>()
        span.held.push(d)
        this.counters.heldWrites++
        jobs.push(d.promise.then(() => device.write(piece, at, { fua })))
      } else {
        const tracked = this.trackedWrites.add(chunk, span.end)
        this.counters.remappedWrites++
        jobs.push(
          (async () => {
            try {
              await cow.write(piece, newChunk * cb + (at - chunk * cb), { fua })
            } finally {
              this.trackedWrites.remove(tracked)
            }
          })(),
        )
      }
      pos = runEnd
    }
    await settleAll(jobs)
  }
}

/** The error held writes of a failed step get. */
export function mergeFailedError(message: string, cause?: unknown): SnapError {
  return new SnapError('SNAP_MERGE_FAILED', message, cause === undefined ? undefined : { cause })
}
