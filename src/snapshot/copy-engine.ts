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
   * once; every target's `done` is called when its copy ends. `targets` is not kept. Driven by
   * callbacks from the read to each target's coalesced write: a copy-out allocates no promise
   * unless a target's `before` has to wait.
   */
  copyOut(source: BlockDevice, targets: readonly CopyTarget[]): void {
    if (targets.length === 0) return
    let start = Infinity
    let end = 0
    for (const t of targets) {
      if (t.from < start) start = t.from
      if (t.from + t.length > end) end = t.from + t.length
    }
    const job = new CopyOut(this, enginePool.acquire(end - start), start, targets.length)
    this.active += targets.length
    source.readIntoThen(job.data, start, (err) => job.readEnded(err))
    for (const t of targets) {
      if (t.prepare) {
        t.prepare((err) => job.prepared(t, err))
        continue
      }
      let wait: Promise<void> | null
      try {
        wait = t.before ? t.before() : null
      } catch (err) {
        wait = Promise.reject(err) // reported later, like every other outcome
      }
      if (wait === null) job.prepared(t, null)
      else wait.then(() => job.prepared(t, null), (err: unknown) => job.finish(t, new CopyFailure('prepare', err)))
    }
  }

  /** @internal A target of a copy-out has ended (CopyOut). */
  targetDone(t: CopyTarget, failure: CopyFailure | null): void {
    this.active--
    t.done(failure)
  }

  /** @internal The device's write combiner: copies into one COW are coalesced whoever started them. */
  writerFor(device: BlockDevice): WriteCombiner {
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

/**
 * One copy-out: the source read shared by its targets, and where each target stands. A class
 * rather than closures over shared variables: at one copy-out per first-touch write, the
 * closures and their contexts were a good part of the write's garbage.
 */
class CopyOut {
  readonly data: Uint8Array
  private readonly engine: CopyEngine
  private readonly start: number
  private ended = false
  private readError: unknown = null
  /** Prepared targets waiting for the read: the first one, then the rest (most copy-outs have one target). */
  private waitingFirst: CopyTarget | null = null
  private waitingMore: CopyTarget[] | null = null
  private targetsLeft: number

  constructor(engine: CopyEngine, data: Uint8Array, start: number, targets: number) {
    this.engine = engine
    this.data = data
    this.start = start
    this.targetsLeft = targets
  }

  readEnded(err: unknown): void {
    this.ended = true
    this.readError = err
    if (this.targetsLeft === 0) enginePool.release(this.data)
    const first = this.waitingFirst
    const more = this.waitingMore
    this.waitingFirst = null
    this.waitingMore = null
    if (first !== null) this.write(first)
    if (more !== null) for (const t of more) this.write(t)
  }

  /** `t` is ready for its write (err null) or failed to prepare. */
  prepared(t: CopyTarget, err: unknown): void {
    if (err !== null) this.prepareFailed(t, err)
    else if (this.ended) this.write(t)
    else if (this.waitingFirst === null) this.waitingFirst = t
    else (this.waitingMore ??= []).push(t)
  }

  /** Reported later, never from inside copyOut (a method of its own: no closure context per prepared()). */
  private prepareFailed(t: CopyTarget, err: unknown): void {
    queueMicrotask(() => this.finish(t, new CopyFailure('prepare', err)))
  }

  private write(t: CopyTarget): void {
    if (this.readError !== null) return this.finish(t, new CopyFailure('read', this.readError))
    const at = t.from - this.start
    const piece = at === 0 && t.length === this.data.length ? this.data : this.data.subarray(at, at + t.length)
    this.engine.writerFor(t.device).writeThen(piece, t.to, (err) => this.finish(t, err === null ? null : new CopyFailure('write', err)))
  }

  // The buffer goes back once the read has ended and every target's write is done with it.
  finish(t: CopyTarget, failure: CopyFailure | null): void {
    if (--this.targetsLeft === 0 && this.ended) enginePool.release(this.data)
    this.engine.targetDone(t, failure)
  }
}
