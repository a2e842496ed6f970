/**
 * The copy engine (the role dm-kcopyd plays for dm-snapshot): every data copy between the origin
 * and a COW goes through here — origin → COW copy-outs for first-touch writes and relocation,
 * COW → origin copies of a merge.
 *
 * - copyOut: one read of the source feeds several destinations (the snapshots that need the same
 *   old data: kcopyd's one source, several destinations). Each destination is one extent and
 *   reports its own outcome through a callback, so one failing snapshot does not fail the others
 *   and the caller allocates no promise per destination.
 * - Small destination writes are coalesced per device (WriteCombiner): random first-touch writes
 *   land in consecutive COW chunks and go out as one write.
 * - copyRegions: a list of regions copied by a few workers that pull the next region from a
 *   shared cursor (kcopyd's sub-jobs), each region in pieces of at most pieceBytes, so a merge
 *   step holds a bounded amount of memory; the first failure stops the workers, and every
 *   piece in flight settles before the failure is reported.
 * - inFlight counts destinations and pieces being copied, for whoever throttles on it.
 * Failures carry their stage (read or write), since callers word them differently.
 */
import type { BlockDevice } from '../device/block-device.js'
import { WriteCombiner } from '../device/write-combiner.js'
import { enginePool } from '../util/buffer-pool.js'

/** Largest single read or write of a region copy. */
export const COPY_PIECE_BYTES = 1024 * 1024

export type CopyStage = 'prepare' | 'read' | 'write'

/** A failed copy: where it failed and the underlying error. */
export class CopyFailure extends Error {
  readonly stage: CopyStage

  constructor(stage: CopyStage, cause: unknown) {
    super(`copy ${stage} failed: ${cause instanceof Error ? cause.message : String(cause)}`, { cause })
    this.stage = stage
  }
}

/** One destination of a copy-out: source bytes [from, from + length) go to `device` at `to`. */
export interface CopyTarget {
  readonly from: number
  readonly length: number
  readonly device: BlockDevice
  readonly to: number
  /**
   * Runs before the write (e.g. growing the COW): null when there is nothing to wait for; a
   * rejection (or a throw) fails this target at 'prepare'. Runs while the source is read.
   */
  readonly before?: () => Promise<void> | null
  /** `before` with a callback (null or the error), which it may call at once: no promise per target. */
  readonly prepare?: (ready: (err: unknown) => void) => void
  /** Called exactly once: null when the data is on the device, else the failure. */
  readonly done: (failure: CopyFailure | null) => void
}

/** One region of a region copy: `length` bytes from source offset `from` to target offset `to`. */
export interface CopyRegion {
  readonly from: number
  readonly to: number
  readonly length: number
}

export interface RegionCopyOptions {
  /** Regions copied at the same time. */
  readonly concurrency?: number
  readonly pieceBytes?: number
}

export class CopyEngine {
  private readonly combiners = new WeakMap<BlockDevice, WriteCombiner>()
  private active = 0

  /** Destinations and region pieces being copied right now. */
  get inFlight(): number {
    return this.active
  }

  /**
   * Copies the source bytes each target needs, with one read over the span of all of them (the
   * bytes in between are read but unused; callers keep the targets close together). Returns at
   * once; every target's `done` is called when its copy ends. Driven by callbacks from the read
   * to each target's coalesced write: a copy-out allocates no promise unless a target's
   * `before` has to wait.
   */
  copyOut(source: BlockDevice, targets: readonly CopyTarget[]): void {
    if (targets.length === 0) return
    let start = Infinity
    let end = 0
    for (const t of targets) {
      if (t.from < start) start = t.from
      if (t.from + t.length > end) end = t.from + t.length
    }
    const data = enginePool.acquire(end - start)
    let readEnded = false
    let readError: unknown = null
    let ready: CopyTarget[] | null = [] // prepared targets waiting for the read
    let targetsLeft = targets.length
    // The buffer goes back once the read has ended and every target's write is done with it.
    const finish = (t: CopyTarget, failure: CopyFailure | null): void => {
      if (--targetsLeft === 0 && readEnded) enginePool.release(data)
      this.targetDone(t, failure)
    }
    const write = (t: CopyTarget): void => {
      if (readError !== null) return finish(t, new CopyFailure('read', readError))
      this.writerFor(t.device).writeThen(data.subarray(t.from - start, t.from - start + t.length), t.to, (err) =>
        finish(t, err === null ? null : new CopyFailure('write', err)),
      )
    }
    const prepared = (t: CopyTarget): void => {
      if (readEnded) write(t)
      else ready?.push(t)
    }
    this.active += targets.length
    source.readIntoThen(data, start, (err) => {
      readEnded = true
      readError = err
      const waiting = ready as CopyTarget[]
      ready = null
      if (targetsLeft === 0) enginePool.release(data)
      for (const t of waiting) write(t)
    })
    for (const t of targets) {
      if (t.prepare) {
        t.prepare((err) => {
          if (err === null) prepared(t)
          // Reported later, never from inside copyOut.
          else queueMicrotask(() => finish(t, new CopyFailure('prepare', err)))
        })
        continue
      }
      let wait: Promise<void> | null
      try {
        wait = t.before ? t.before() : null
      } catch (err) {
        wait = Promise.reject(err) // reported later, like every other outcome
      }
      if (wait === null) prepared(t)
      else wait.then(() => prepared(t), (err: unknown) => finish(t, new CopyFailure('prepare', err)))
    }
  }

  private targetDone(t: CopyTarget, failure: CopyFailure | null): void {
    this.active--
    t.done(failure)
  }

  /** The device's write combiner: copies into one COW are coalesced whoever started them. */
  private writerFor(device: BlockDevice): WriteCombiner {
    let combiner = this.combiners.get(device)
    if (!combiner) {
      combiner = new WriteCombiner(device)
      this.combiners.set(device, combiner)
    }
    return combiner
  }

  /**
   * Copies every region from `source` to `target`, `concurrency` regions at a time, each in
   * pieces of at most `pieceBytes`. Rejects with the first CopyFailure once every piece in
   * flight has settled; regions not started by then are not copied.
   */
  async copyRegions(source: BlockDevice, target: BlockDevice, regions: readonly CopyRegion[], options: RegionCopyOptions = {}): Promise<void> {
    const pieceBytes = options.pieceBytes ?? COPY_PIECE_BYTES
    let next = 0
    let failure: CopyFailure | null = null
    let longest = 0
    for (const r of regions) if (r.length > longest) longest = r.length
    const bufferBytes = Math.min(pieceBytes, longest)
    const worker = async (): Promise<void> => {
      // One buffer per worker, reused for every piece: a fresh 1 MiB buffer per piece cost a
      // merge more in zeroing and garbage collection than its reads and writes.
      let buffer: Uint8Array | null = null
      while (failure === null && next < regions.length) {
        const r = regions[next++] as CopyRegion
        for (let done = 0; done < r.length && failure === null; done += pieceBytes) {
          const n = Math.min(pieceBytes, r.length - done)
          buffer ??= new Uint8Array(bufferBytes)
          this.active++
          try {
            await this.copyPiece(source, target, r.from + done, r.to + done, buffer.subarray(0, n))
          } catch (err) {
            failure ??= err as CopyFailure
          } finally {
            this.active--
          }
        }
      }
    }
    const workers = Math.max(1, Math.min(options.concurrency ?? 8, regions.length))
    await Promise.all(Array.from({ length: workers }, worker))
    if (failure) throw failure
  }

  /** Copies `data.length` bytes through `data`, which the caller reuses once this settles. */
  private async copyPiece(source: BlockDevice, target: BlockDevice, from: number, to: number, data: Uint8Array): Promise<void> {
    try {
      await source.readInto(data, from)
    } catch (err) {
      throw new CopyFailure('read', err)
    }
    try {
      await target.write(data, to)
    } catch (err) {
      throw new CopyFailure('write', err)
    }
  }
}
