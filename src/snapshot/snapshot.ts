/**
 * Snapshot: the point-in-time view of an origin (the kernel's `snapshot` target), and the
 * per-snapshot machinery the origin uses to copy chunks into it.
 *
 * Design notes
 * - A chunk is in one of three states: no exception (reads fall through to the origin), pending
 *   (a copy is in flight; reads still fall through, tracked), complete (reads and writes go to
 *   the COW). The complete exception is inserted before the pending one is removed, so anyone
 *   looking always sees one of the two.
 * - Reads that fall through to the origin are tracked per chunk; completing a pending exception
 *   waits for them after the insert and before the origin write it protects is released, so a
 *   slow read can never return data written after the snapshot.
 * - Every prepared exception is handed to the store's commit exactly once, failed or not, so the
 *   store's allocation-order commit never stalls.
 * - Invalidation is permanent; the header write (persistent stores) is awaited before the
 *   origin write that caused it proceeds.
 * - JavaScript is single threaded: the only hazard is an await between a lookup and the action
 *   that depends on it. Lookups and pending-table inserts happen without an await in between.
 */
import { EventEmitter } from 'node:events'
import { BaseBlockDevice, type BlockDevice, type DeviceCapabilities } from '../device/block-device.js'
import { WriteCombiner } from '../device/write-combiner.js'
import { SnapError, isSnapError } from '../errors.js'
import { ExceptionList } from '../format/exception-list.js'
import type { ExceptionStore, StoreUsage } from '../store/exception-store.js'
import { SECTOR_BYTES } from '../units.js'
import { ChunkTracker } from './chunk-tracker.js'
import { ExceptionTable } from './exception-table.js'
import type { ExceptionEvents } from './exception-events.js'
import { PendingException } from './pending-exception.js'

/** Copies in flight above which new writes wait (kernel snapshot_cow_threshold). */
export const COW_THRESHOLD = 2048

/** Largest single origin read / COW write when consecutive chunks are copied together. */
const COPY_RUN_BYTES = 1024 * 1024

/**
 * One origin read shared by the copies several snapshots start for the same origin write: with
 * N snapshots the old data is read once, not N times. `data` holds origin bytes from `start`.
 */
export interface SharedOriginRead {
  readonly start: number
  readonly data: Promise<Uint8Array>
}

export type SnapshotState = 'active' | 'invalid' | 'overflow' | 'merging' | 'merge-failed'

export interface SnapshotOptions {
  readonly name: string
  readonly store: ExceptionStore
  /** PO: a full COW on a snapshot write overflows instead of invalidating. */
  readonly overflow?: boolean
  readonly discardZeroesCow?: boolean
  readonly discardPassdownOrigin?: boolean
  /** Emit 'threshold' once when allocated bytes reach this many. */
  readonly usageThresholdBytes?: number
}

/** What a snapshot needs from its origin; implemented by Origin. */
export interface OriginBacking {
  readonly device: BlockDevice
  readonly events: ExceptionEvents
  readonly sizeBytes: number
}

export class Snapshot extends BaseBlockDevice {
  readonly capabilities: DeviceCapabilities
  readonly store: ExceptionStore
  /** COW data writes of copies: neighbours in the COW go out as one write. */
  private readonly copyWriter: WriteCombiner
  readonly overflowMode: boolean
  readonly discardZeroesCow: boolean
  readonly discardPassdownOrigin: boolean
  readonly table = new ExceptionTable()
  readonly pending = new Map<number, PendingException>()
  /** Origin reads of this snapshot in flight, per chunk (kernel: tracked chunks). */
  readonly trackedReads = new ChunkTracker()
  readonly emitter = new EventEmitter()
  readonly snapshotName: string

  private _valid = true
  private _overflowed = false
  /** Origin writes copy into this snapshot only once it is active. */
  active = false
  /** Set by the merge: the snapshot's own view refuses I/O and origin writes ignore it. */
  merging = false
  mergeFailed = false
  private invalidation: Promise<void> | null = null
  /** The invalidation's header write has finished (origin writes need not wait for it). */
  private invalidationDurable = false
  private inProgress = 0
  private throttleWaiters: Array<() => void> = []
  private readonly usageThresholdBytes: number | undefined
  private thresholdFired = false
  private backing: OriginBacking | null = null

  constructor(options: SnapshotOptions) {
    super(0, `snapshot ${options.name}`)
    this.snapshotName = options.name
    this.store = options.store
    this.copyWriter = new WriteCombiner(options.store.cow)
    this.overflowMode = options.overflow === true
    this.discardZeroesCow = options.discardZeroesCow === true
    this.discardPassdownOrigin = options.discardPassdownOrigin === true
    if (this.discardPassdownOrigin && !this.discardZeroesCow) {
      throw new SnapError('SNAP_BAD_ARGUMENT', 'discard_passdown_origin feature depends on discard_zeroes_cow')
    }
    this.usageThresholdBytes = options.usageThresholdBytes
    this.capabilities = { writable: true, flush: true, fua: true, discard: this.discardZeroesCow, resize: false }
  }

  get chunkBytes(): number {
    return this.store.chunkBytes
  }

  get valid(): boolean {
    return this._valid
  }

  get overflowed(): boolean {
    return this._overflowed
  }

  get state(): SnapshotState {
    if (!this._valid) return 'invalid'
    if (this.mergeFailed) return 'merge-failed'
    if (this.merging) return 'merging'
    if (this._overflowed) return 'overflow'
    return 'active'
  }

  get copiesInFlight(): number {
    return this.inProgress
  }

  usage(): StoreUsage {
    return this.store.usage()
  }

  /** The kernel's info status word(s) for this snapshot, e.g. "16/204800 16" or "Invalid". */
  statusText(): string {
    if (!this._valid) return 'Invalid'
    if (this.mergeFailed) return 'Merge failed'
    if (this._overflowed) return 'Overflow'
    const u = this.store.usage()
    return `${u.allocatedSectors}/${u.totalSectors} ${u.metadataSectors}`
  }

  /**
   * Loads the store's metadata into the table and binds the snapshot to its origin. Called by
   * Origin while origin writes are held.
   */
  async load(backing: OriginBacking): Promise<void> {
    this.backing = backing
    this._sizeBytes = backing.sizeBytes
    const table = this.table
    const insert = (oldChunk: number, newChunk: number): void => {
      // insert() scans the chunk's whole group and refuses a chunk already mapped, so no
      // separate lookup first (that doubled the cost of opening a big COW).
      const before = table.size
      try {
        table.insert(oldChunk, newChunk)
      } catch (err) {
        if (isSnapError(err) || table.size !== before) throw err
        throw new SnapError('SNAP_CORRUPT_METADATA', `duplicate exception for origin chunk ${oldChunk}`, {
          details: { chunk: oldChunk },
        })
      }
    }
    let valid: boolean
    if (this.store.readMetadataInto) {
      // Bulk: one sort and one pass instead of 10^7 inserts into crowded groups. Whatever the
      // bulk load declines (duplicates, chunks >= 2^32, a read error part way) goes through
      // insert() in table order, so errors and the table come out as they always did.
      const list = new ExceptionList()
      let failure: { err: unknown } | null = null
      valid = true
      try {
        ;({ valid } = await this.store.readMetadataInto(list))
      } catch (err) {
        failure = { err }
      }
      // bulkLoad sorts in its first argument, hence the copy: the fallback needs table order
      if (failure !== null || !list.allBelow2To32 || !table.bulkLoad(list.oldLo.slice(0, list.count), list.newLo, list.count)) {
        for (let i = 0; i < list.count; i++) insert(list.oldAt(i), list.newAt(i))
      }
      if (failure !== null) throw failure.err
    } else {
      ;({ valid } = await this.store.readMetadata(insert))
    }
    if (!valid) this._valid = false
  }

  private get origin(): OriginBacking {
    if (!this.backing) throw new SnapError('SNAP_BAD_ARGUMENT', `${this.name} is not attached to an origin`)
    return this.backing
  }

  // ---- used by the origin (and merge) to protect chunks -----------------------------------

  /**
   * Makes sure the chunk holding origin byte `offset` is saved or being saved. Returns the
   * pending exception to wait for, or null when nothing is (or can be) needed. `invalidations`
   * collects the promises of invalidations caused by a full COW.
   */
  protectOriginChunk(offset: number, invalidations: Array<Promise<void>>, batch?: PendingException[]): PendingException | null {
    if (!this.active || this.merging) return null
    if (!this._valid) {
      // Until the invalid header is durable a crash brings this snapshot back valid, so no
      // origin write it did not save may reach the device before then.
      if (this.invalidation && !this.invalidationDurable) invalidations.push(this.invalidation)
      return null
    }
    if (offset >= this._sizeBytes) return null
    const chunk = Math.floor(offset / this.chunkBytes)
    let pe = this.pending.get(chunk)
    if (!pe) {
      if (this.table.lookup(chunk) !== -1) return null
      try {
        pe = this.newPending(chunk)
      } catch (err) {
        if (!isSnapError(err, 'SNAP_NO_SPACE')) throw err
        invalidations.push(this.invalidate('Unable to allocate exception.'))
        return null
      }
    }
    if (!pe.started) {
      if (batch) {
        // started now, copied by startCopies() together with its consecutive neighbours
        pe.started = true
        this.inProgress++
        batch.push(pe)
      } else {
        this.startCopy(pe)
      }
    }
    return pe
  }

  /**
   * Copies the pending exceptions collected by protectOriginChunk(..., batch): neighbours that
   * are consecutive both on the origin and in the COW are copied with one origin read and one
   * COW write instead of one pair per chunk (a 1 MiB first-touch write over 4 KiB chunks was
   * 512 small syscalls through the libuv pool).
   */
  startCopies(batch: PendingException[], source?: SharedOriginRead): void {
    const maxRun = Math.max(1, Math.floor(COPY_RUN_BYTES / this.chunkBytes))
    let from = 0
    for (let i = 1; i <= batch.length; i++) {
      const prev = batch[i - 1] as PendingException
      const pe = batch[i]
      if (pe && i - from < maxRun && pe.chunk === prev.chunk + 1 && pe.newChunk === prev.newChunk + 1) continue
      void this.copyRun(batch.slice(from, i), source)
      from = i
    }
  }

  /** The byte range of the origin that `batch` (in chunk order) copies. */
  copySpan(batch: readonly PendingException[]): [number, number] {
    const first = batch[0] as PendingException
    const last = batch[batch.length - 1] as PendingException
    // The last origin chunk may be partial; the rest of its COW chunk is left as it is.
    return [first.chunk * this.chunkBytes, Math.min((last.chunk + 1) * this.chunkBytes, this.origin.sizeBytes)]
  }

  private async copyRun(run: PendingException[], source?: SharedOriginRead): Promise<void> {
    const chunkBytes = this.chunkBytes
    const first = run[0] as PendingException
    const [start, end] = this.copySpan(run)
    let ok = true
    try {
      await this.store.whenSpaceReady((run[run.length - 1] as PendingException).prepared)
      const data = source
        ? (await source.data).subarray(start - source.start, end - source.start)
        : await this.origin.device.read(start, end - start)
      await this.copyWriter.write(data, first.newChunk * chunkBytes)
    } catch {
      ok = false
    }
    // All at once: the store's group commit waits until every prepared exception is handed over.
    await Promise.all(run.map((pe) => this.finishPending(pe, ok)))
  }

  private newPending(chunk: number): PendingException {
    const prepared = this.store.prepareException(chunk)
    const pe = new PendingException(chunk, prepared)
    this.pending.set(chunk, pe)
    return pe
  }

  private startCopy(pe: PendingException): void {
    pe.started = true
    this.inProgress++
    void this.copyRun([pe])
  }

  /** Commit, publish and release a pending exception (kernel: pending_complete). */
  private async finishPending(pe: PendingException, copyOk: boolean): Promise<void> {
    this.inProgress--
    this.wakeThrottled()
    const committed = await this.store.commitException(pe.prepared, copyOk)
    let success = false
    if (!copyOk || !committed) {
      await this.invalidate('Error reading/writing.')
    } else if (this._valid) {
      this.table.insert(pe.chunk, pe.newChunk)
      await this.trackedReads.drain(pe.chunk)
      success = true
    }
    this.pending.delete(pe.chunk)
    this.origin.events.completed()
    pe.settle(success)
    if (success) this.checkThreshold()
  }

  /** Permanently invalidates the snapshot; resolves once that is durable. */
  invalidate(reason: string): Promise<void> {
    if (this.invalidation) return this.invalidation
    this._valid = false
    this.invalidation = this.store.dropSnapshot().finally(() => {
      this.invalidationDurable = true
    })
    this.emitter.emit('invalidated', reason)
    return this.invalidation
  }

  /** Marks the snapshot invalid in memory only (handover source: its header stays valid). */
  markInvalidInMemory(): void {
    this._valid = false
  }

  private checkThreshold(): void {
    if (this.thresholdFired || this.usageThresholdBytes === undefined) return
    const allocatedBytes = this.store.usage().allocatedSectors * SECTOR_BYTES
    if (allocatedBytes >= this.usageThresholdBytes) {
      this.thresholdFired = true
      this.emitter.emit('threshold', { allocatedBytes, thresholdBytes: this.usageThresholdBytes })
    }
  }

  /** Null when at most COW_THRESHOLD copies are in flight, else a promise for a wake-up. */
  belowThresholdWait(): Promise<void> | null {
    if (this.inProgress <= COW_THRESHOLD) return null
    return new Promise<void>((resolve) => this.throttleWaiters.push(resolve))
  }

  private wakeThrottled(): void {
    if (this.inProgress > COW_THRESHOLD || this.throttleWaiters.length === 0) return
    const waiters = this.throttleWaiters
    this.throttleWaiters = []
    for (const wake of waiters) wake()
  }

  /** Waits until no pending exception of this snapshot is in flight (kernel destructor). */
  async drainPending(): Promise<void> {
    while (this.pending.size > 0) {
      await Promise.all([...this.pending.values()].map((pe) => pe.done))
    }
  }

  // ---- the snapshot's own view (BlockDevice hooks) ----------------------------------------

  private checkUsable(write: boolean): void {
    if (!this._valid) throw new SnapError('SNAP_INVALID', `${this.name} is invalid`)
    if (this.merging) throw new SnapError('SNAP_INVALID', `${this.name} is being merged into its origin`)
    if (write && this._overflowed) throw new SnapError('SNAP_OVERFLOW', `${this.name} has overflowed`)
  }

  protected async _readInto(target: Uint8Array, offset: number): Promise<void> {
    this.checkUsable(false)
    const chunkBytes = this.chunkBytes
    const end = offset + target.length
    // Walk chunk by chunk, coalescing neighbours that go to the same place in one device read.
    // cow holds [targetStart, targetEnd, cowOffset] triples; origin pieces are counted only.
    const cow: number[] = []
    let originPieces = 0
    let firstOrigin = -1
    let pos = offset
    while (pos < end) {
      const chunk = Math.floor(pos / chunkBytes)
      const newChunk = this.table.lookup(chunk)
      let runEnd = Math.min(end, (chunk + 1) * chunkBytes)
      let next = chunk + 1
      if (newChunk !== -1) {
        while (runEnd < end && this.table.lookup(next) === newChunk + (next - chunk)) {
          runEnd = Math.min(end, (next + 1) * chunkBytes)
          next++
        }
        cow.push(pos - offset, runEnd - offset, newChunk * chunkBytes + (pos - chunk * chunkBytes))
      } else {
        while (runEnd < end && this.table.lookup(next) === -1) {
          runEnd = Math.min(end, (next + 1) * chunkBytes)
          next++
        }
        if (originPieces++ === 0) firstOrigin = pos
      }
      pos = runEnd
    }
    const firstChunk = Math.floor(offset / chunkBytes)
    const endChunk = Math.floor((end - 1) / chunkBytes) + 1
    if (cow.length === 0) return this.readOriginTracked(target, offset, firstChunk, endChunk)
    if (originPieces > 1) {
      // Fragmented (saved and unsaved chunks interleave): one origin read over the whole range,
      // then the saved chunks on top, instead of one small read per piece. Tracking the saved
      // chunks too is harmless: nobody waits on a chunk whose exception is already complete.
      await this.readOriginTracked(target, offset, firstChunk, endChunk)
      await settleAll(this.cowReads(target, cow))
      return
    }
    const jobs = this.cowReads(target, cow)
    if (originPieces === 1) {
      const pieceEnd = this.originPieceEnd(firstOrigin, end)
      const c0 = Math.floor(firstOrigin / chunkBytes)
      const c1 = Math.floor((pieceEnd - 1) / chunkBytes) + 1
      jobs.push(this.readOriginTracked(target.subarray(firstOrigin - offset, pieceEnd - offset), firstOrigin, c0, c1))
    }
    await settleAll(jobs)
  }

  private cowReads(target: Uint8Array, cow: number[]): Array<Promise<void>> {
    const jobs: Array<Promise<void>> = []
    for (let k = 0; k < cow.length; k += 3) {
      jobs.push(this.store.cow.readInto(target.subarray(cow[k]!, cow[k + 1]!), cow[k + 2]!))
    }
    return jobs
  }

  /** End of the run of unsaved chunks starting at `pos` (same walk as _readInto). */
  private originPieceEnd(pos: number, end: number): number {
    const chunkBytes = this.chunkBytes
    const chunk = Math.floor(pos / chunkBytes)
    let runEnd = Math.min(end, (chunk + 1) * chunkBytes)
    let next = chunk + 1
    while (runEnd < end && this.table.lookup(next) === -1) {
      runEnd = Math.min(end, (next + 1) * chunkBytes)
      next++
    }
    return runEnd
  }

  private async readOriginTracked(target: Uint8Array, offset: number, firstChunk: number, endChunk: number): Promise<void> {
    for (let c = firstChunk; c < endChunk; c++) this.trackedReads.add(c)
    try {
      await this.origin.device.readInto(target, offset)
    } finally {
      for (let c = firstChunk; c < endChunk; c++) this.trackedReads.remove(c)
    }
  }

  protected async _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    this.checkUsable(true)
    for (let wait = this.belowThresholdWait(); wait; wait = this.belowThresholdWait()) await wait
    this.checkUsable(true)
    const chunkBytes = this.chunkBytes
    const jobs: Array<Promise<void>> = []
    let pos = offset
    const end = offset + data.length
    while (pos < end) {
      const chunk = Math.floor(pos / chunkBytes)
      const pieceEnd = Math.min(end, (chunk + 1) * chunkBytes)
      jobs.push(this.writePiece(data.subarray(pos - offset, pieceEnd - offset), pos, chunk, fua))
      pos = pieceEnd
    }
    await settleAll(jobs)
  }

  private async writePiece(data: Uint8Array, offset: number, chunk: number, fua: boolean): Promise<void> {
    const chunkBytes = this.chunkBytes
    const inChunk = offset - chunk * chunkBytes
    let newChunk = this.table.lookup(chunk)
    if (newChunk === -1) {
      let pe = this.pending.get(chunk)
      if (!pe) {
        try {
          pe = this.newPending(chunk)
        } catch (err) {
          if (!isSnapError(err, 'SNAP_NO_SPACE')) throw err
          if (this.overflowMode) {
            if (this._valid) this._overflowed = true
            throw new SnapError('SNAP_OVERFLOW', `${this.name} overflowed: unable to allocate exception`)
          }
          await this.invalidate('Unable to allocate exception.')
          throw new SnapError('SNAP_INVALID', `${this.name} invalidated: COW device is full`)
        }
        if (data.length === chunkBytes) {
          // Whole-chunk write to a fresh exception: the write itself is the copy, no origin read.
          pe.started = true
          this.inProgress++
          let ok = true
          try {
            await this.store.whenSpaceReady(pe.prepared)
            await this.store.cow.write(data, pe.newChunk * chunkBytes)
          } catch {
            ok = false
          }
          await this.finishPending(pe, ok)
          if (!(await pe.done)) throw new SnapError('SNAP_INVALID', `${this.name} invalidated: COW write failed`)
          return
        }
      }
      if (!pe.started) this.startCopy(pe)
      if (!(await pe.done)) throw new SnapError('SNAP_INVALID', `${this.name} invalidated: copy failed`)
      this.checkUsable(true)
      newChunk = this.table.lookup(chunk)
      if (newChunk === -1) throw new SnapError('SNAP_INVALID', `${this.name}: chunk ${chunk} lost its exception`)
    }
    await this.store.cow.write(data, newChunk * chunkBytes + inChunk, { fua })
  }

  protected async _flush(): Promise<void> {
    // Flushes succeed even on an invalid snapshot, as in the kernel.
    await this.store.cow.flush()
  }

  protected override async _discard(offset: number, length: number): Promise<void> {
    this.checkUsable(true)
    const chunkBytes = this.chunkBytes
    const end = offset + length
    const jobs: Array<Promise<void>> = []
    let pos = offset
    while (pos < end) {
      const chunk = Math.floor(pos / chunkBytes)
      const pieceEnd = Math.min(end, (chunk + 1) * chunkBytes)
      jobs.push(this.discardPiece(pos, pieceEnd - pos, chunk))
      pos = pieceEnd
    }
    await settleAll(jobs)
  }

  private async discardPiece(offset: number, length: number, chunk: number): Promise<void> {
    const chunkBytes = this.chunkBytes
    const jobs: Array<Promise<void>> = []
    if (this.discardPassdownOrigin && this.origin.device.capabilities.discard) {
      // Deliberately frees origin space without saving it anywhere (kernel semantics).
      jobs.push(
        (async () => {
          this.trackedReads.add(chunk)
          try {
            await this.origin.device.discard(offset, length)
          } finally {
            this.trackedReads.remove(chunk)
          }
        })(),
      )
    }
    const newChunk = this.table.lookup(chunk)
    if (newChunk !== -1) {
      const cowOffset = newChunk * chunkBytes + (offset - chunk * chunkBytes)
      if (length === chunkBytes) {
        jobs.push(this.store.cow.write(new Uint8Array(chunkBytes), cowOffset))
      } else if (this.store.cow.capabilities.discard) {
        jobs.push(this.store.cow.discard(cowOffset, length))
      } else {
        jobs.push(this.store.cow.write(new Uint8Array(length), cowOffset))
      }
    }
    // No exception: nothing saved, nothing to do, and no exception is created.
    await settleAll(jobs)
  }

  protected override async _close(): Promise<void> {
    await this.drainPending()
    await this.store.close()
  }
}

/** Waits for every job, then rethrows the first failure (no unobserved rejections). */
export async function settleAll(jobs: Array<Promise<void>>): Promise<void> {
  if (jobs.length === 1) return jobs[0]
  const results = await Promise.allSettled(jobs)
  for (const r of results) if (r.status === 'rejected') throw r.reason
}
