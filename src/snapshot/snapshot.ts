/**
 * Snapshot: the point-in-time view of an origin (the kernel's `snapshot` target), and the
 * per-snapshot machinery the origin uses to copy chunks into it.
 *
 * Design notes
 * - The unit of bookkeeping is the extent: a run of chunks consecutive on the origin and in the
 *   COW (capped at COPY_RUN_BYTES and cut at metadata areas by the store). One pending
 *   exception, one copy and one commit per extent, not per chunk.
 * - A chunk is in one of three states: no exception (reads fall through to the origin), pending
 *   (a copy is in flight; reads still fall through, tracked), complete (reads and writes go to
 *   the COW). The complete exceptions are inserted before the pending extent is removed, so
 *   anyone looking always sees one of the two.
 * - Reads that fall through to the origin are tracked as chunk ranges (one entry per read);
 *   completing a pending extent waits for the reads overlapping it after the insert and before
 *   the origin write it protects is released, so a slow read can never return data written
 *   after the snapshot.
 * - State (active, merging, merge failed, invalid, overflow) is one field changed only by the
 *   named transitions (beginMerge, markMergeFailed, invalidate, ...); the origin attaches and
 *   detaches through activate/deactivate.
 * - Every prepared exception is handed to the store's commit exactly once, failed or not, so the
 *   store's allocation-order commit never stalls.
 * - Invalidation is permanent; the header write (persistent stores) is awaited before the
 *   origin write that caused it proceeds.
 * - A copy that cannot get space (a grow-on-demand COW on a full file system: SNAP_NO_SPACE)
 *   invalidates nothing: the exception is abandoned (the store records nothing), the chunk
 *   stays unsaved, and the pending exception settles with the error, which the write that
 *   needed the copy then fails with. A COW of fixed size that is full is the kernel's case and
 *   still invalidates (PO: overflows on snapshot writes). 'no-space' is emitted when copies
 *   start failing so, 'space-restored' when one succeeds again.
 * - Fill events: 'threshold' fires once when the allocated bytes reach the armed threshold
 *   (checked at each commit, not per request); the owner re-arms it. A fixed-size COW may be
 *   extended (autoextend): the owner's CowFullHandler is asked when an allocation finds it full
 *   and may hand back an extension in flight, which the copy waits for before it retries.
 * - JavaScript is single threaded: the only hazard is an await between a lookup and the action
 *   that depends on it. Lookups and pending-table inserts happen without an await in between.
 */
import { EventEmitter } from 'node:events'
import { BaseBlockDevice, type BlockDevice, type DeviceCapabilities } from '../device/block-device.js'
import { SnapError, isSnapError } from '../errors.js'
import { ExceptionList } from '../format/exception-list.js'
import type { ExceptionStore, StoreUsage } from '../store/exception-store.js'
import { SECTOR_BYTES } from '../units.js'
import { type Deferred, deferred } from '../util/deferred.js'
import type { CopyEngine, CopyFailure, CopyTarget } from './copy-engine.js'
import { ExceptionTable } from './exception-table.js'
import { type ChunkRun, exceptionRunsIn } from './exception-runs.js'
import type { ExceptionEvents } from './exception-events.js'
import { ExtentList } from './extent-list.js'
import { ExtensionWait, type OriginWait, PendingException } from './pending-exception.js'
import { RangeTracker } from './range-tracker.js'

/** Invalidation reasons (the kernel logs "Unable to allocate exception." and "Error reading/writing."). */
export const COW_FULL = 'COW full'
export const COW_IO_ERROR = 'COW I/O error'

/** Copies in flight above which new writes wait (kernel snapshot_cow_threshold). */
export const COW_THRESHOLD = 2048

/** Largest extent of one pending copy (one origin read, one COW write, one commit waiter). */
const COPY_RUN_BYTES = 1024 * 1024

/** Origin chunks [startChunk, endChunk). */
export interface ChunkRange {
  startChunk: number
  endChunk: number
}

export type SnapshotState = 'active' | 'invalid' | 'overflow' | 'merging' | 'merge-failed'

export interface SnapshotOptions {
  readonly name: string
  readonly store: ExceptionStore
  /** PO: a full COW on a snapshot write overflows instead of invalidating. */
  readonly overflow?: boolean
  readonly discardZeroesCow?: boolean
  readonly discardPassdownOrigin?: boolean
  /** Emit 'threshold' once when allocated bytes reach this many (setUsageThreshold re-arms it). */
  readonly usageThresholdBytes?: number
}

/**
 * Asked, synchronously, when an allocation finds a fixed-size COW full: may start extending the
 * COW (extendCow) and return that extension for the copy to wait for and retry; null keeps the
 * kernel's behaviour (invalidate, or overflow for PO).
 */
export type CowFullHandler = () => Promise<void> | null

/** Where protectOrigin reports what a pass found (the origin's ProtectPass). */
export interface ProtectSink {
  /** Something the origin write must wait for before it looks again. */
  wait(w: OriginWait): void
  /** An invalidation whose header write must be durable before the origin write goes on. */
  invalidation(durable: Promise<void>): void
  /** The copy of an extent just made pending: the caller must start it. */
  copy(target: CopyTarget): void
}

/** What a snapshot needs from its origin; implemented by Origin. */
export interface OriginBacking {
  readonly device: BlockDevice
  readonly events: ExceptionEvents
  readonly sizeBytes: number
  /** Copies origin → COW (and, for the merge, back). */
  readonly copies: CopyEngine
}

export class Snapshot extends BaseBlockDevice {
  readonly capabilities: DeviceCapabilities
  readonly store: ExceptionStore
  readonly overflowMode: boolean
  readonly discardZeroesCow: boolean
  readonly discardPassdownOrigin: boolean
  private readonly exceptions = new ExceptionTable()
  /** Copies in flight, one per extent, disjoint and sorted (kernel: pending exceptions). */
  private readonly pending = new ExtentList<PendingException>()
  /** Origin reads of this snapshot in flight, as chunk ranges (kernel: tracked chunks). */
  private readonly trackedReads = new RangeTracker()
  readonly emitter = new EventEmitter()
  readonly snapshotName: string

  /** The one state field; changed only by the named transitions below. */
  private condition: SnapshotState = 'active'
  /** Attached to an origin whose writes copy into it (activate/deactivate, by the origin). */
  private attached = false
  private invalidation: Promise<void> | null = null
  /** The invalidation's header write has finished (origin writes need not wait for it). */
  private invalidationDurable = false
  private inProgress = 0
  /** Chunks copied out of the origin into this snapshot since it was opened (monotonic). */
  private copiedOut = 0
  /** What writes held back by COW_THRESHOLD wait for: one promise for all of them (null: none wait). */
  private throttled: Deferred<void> | null = null
  /** Allocated bytes at which 'threshold' fires next; null: not armed. */
  private usageThresholdBytes: number | null
  private fullHandler: CowFullHandler | null = null
  private outOfSpace = false // the last copy that ended failed for want of space
  private invalidReason: string | null = null
  private backing: OriginBacking | null = null

  constructor(options: SnapshotOptions) {
    super(0, `snapshot ${options.name}`)
    this.snapshotName = options.name
    this.store = options.store
    this.overflowMode = options.overflow === true
    this.discardZeroesCow = options.discardZeroesCow === true
    this.discardPassdownOrigin = options.discardPassdownOrigin === true
    if (this.discardPassdownOrigin && !this.discardZeroesCow) {
      throw new SnapError('SNAP_BAD_ARGUMENT', 'discard_passdown_origin feature depends on discard_zeroes_cow')
    }
    this.usageThresholdBytes = options.usageThresholdBytes ?? null
    this.capabilities = { writable: true, flush: true, fua: true, discard: this.discardZeroesCow, resize: false }
  }

  get chunkBytes(): number {
    return this.store.chunkBytes
  }

  /** @internal The complete exceptions (read-only use: lookups, sizes; changes go through this class). */
  get table(): ExceptionTable {
    return this.exceptions
  }

  get state(): SnapshotState {
    return this.condition
  }

  get valid(): boolean {
    return this.condition !== 'invalid'
  }

  get overflowed(): boolean {
    return this.condition === 'overflow'
  }

  /** Handed over to a merge (stays true once merged, so a gone export can say why). */
  get merging(): boolean {
    return this.condition === 'merging' || this.condition === 'merge-failed'
  }

  get mergeFailed(): boolean {
    return this.condition === 'merge-failed'
  }

  /** Origin writes copy into this snapshot only while it is active (attached). */
  get active(): boolean {
    return this.attached
  }

  /** Why this process invalidated the snapshot (COW_FULL, COW_IO_ERROR), null if it did not. */
  get invalidationReason(): string | null {
    return this.invalidReason
  }

  get copiesInFlight(): number {
    return this.inProgress
  }

  /**
   * Chunks this process copied out of the origin into the COW (origin writes that had to save
   * the old data first), counted as they are published; a monotonic counter for metrics.
   */
  get copiedOutChunks(): number {
    return this.copiedOut
  }

  usage(): StoreUsage {
    return this.store.usage()
  }

  /** Complete exceptions for origin chunks in [firstChunk, endChunk), as runs in chunk order. */
  exceptionRunsIn(firstChunk: number, endChunk: number): ChunkRun[] {
    return exceptionRunsIn(this.table, firstChunk, endChunk)
  }

  /** Origin chunks in [firstChunk, endChunk) whose copy is under way (not yet in the table). */
  pendingChunksIn(firstChunk: number, endChunk: number): number[] {
    const chunks: number[] = []
    for (let e = this.pending.firstFrom(firstChunk); e !== null && e.firstChunk < endChunk; e = this.pending.firstFrom(e.firstChunk + e.count)) {
      for (let c = Math.max(firstChunk, e.firstChunk); c < Math.min(endChunk, e.firstChunk + e.count); c++) chunks.push(c)
    }
    return chunks
  }

  // ---- fill ----------------------------------------------------------------------------------

  /** Arms 'threshold' to fire once allocation reaches `bytes` (null disarms it). */
  setUsageThreshold(bytes: number | null): void {
    this.usageThresholdBytes = bytes
  }

  /** Who decides what a full fixed-size COW does (autoextend); null: the kernel's behaviour. */
  setCowFullHandler(handler: CowFullHandler | null): void {
    this.fullHandler = handler
  }

  /** Extends the fixed-size COW to `sizeBytes` (autoextend); copies may use the room once it resolves. */
  extendCow(sizeBytes: number): Promise<void> {
    return this.store.growTo(sizeBytes)
  }

  /** An extension to wait for instead of treating the COW as full, or null. */
  private extensionForFullCow(): Promise<void> | null {
    const extension = this.fullHandler?.() ?? null
    // The waiter retries whatever the outcome: a failed extension leaves the COW full.
    return extension === null ? null : extension.catch(() => {})
  }

  // ---- state transitions -------------------------------------------------------------------

  /** Called by the origin once the snapshot is registered: origin writes copy into it. */
  activate(): void {
    this.attached = true
  }

  /** Called by the origin when the snapshot is detached. */
  deactivate(): void {
    this.attached = false
  }

  /** Handed over to a merge: its own view refuses I/O and origin writes no longer copy into it. */
  beginMerge(): void {
    if (this.condition === 'active' || this.condition === 'overflow') this.condition = 'merging'
  }

  /** A merge step failed (kernel status `Merge failed`); stays set. */
  markMergeFailed(): void {
    if (this.condition !== 'invalid') this.condition = 'merge-failed'
  }

  /** A snapshot write found the COW full (PO tables). */
  private markOverflowed(): void {
    if (this.condition === 'active') this.condition = 'overflow'
  }

  /** Marks the snapshot invalid in memory only (handover source: its header stays valid). */
  markInvalidInMemory(): void {
    this.condition = 'invalid'
  }

  /** Permanently invalidates the snapshot; resolves once that is durable. */
  invalidate(reason: string): Promise<void> {
    if (this.invalidation) return this.invalidation
    this.condition = 'invalid'
    this.invalidReason = reason
    this.invalidation = this.store.dropSnapshot().finally(() => {
      this.invalidationDurable = true
    })
    this.emitter.emit('invalidated', reason)
    return this.invalidation
  }

  /**
   * The merge's in-memory half of a commit: the `count` chunks from `firstChunk` leave the
   * table, highest first (the store already dropped their entries durably).
   */
  dropMerged(firstChunk: number, count: number): void {
    this.exceptions.removeRun(firstChunk, count)
  }

  /**
   * Where the snapshot differs from the origin, for changed-block tracking: whether origin byte
   * `offset` is held in the COW, and where that run (of held or not held chunks) ends, at most
   * at `end`.
   */
  changedExtentAt(offset: number, end: number): { readonly inCow: boolean; readonly endBytes: number } {
    const cb = this.chunkBytes
    const chunk = Math.floor(offset / cb)
    const lastChunk = Math.ceil(end / cb)
    const inCow = this.exceptions.has(chunk)
    const next = inCow ? this.exceptions.nextUnmapped(chunk, lastChunk) : this.exceptions.nextMapped(chunk, lastChunk)
    return { inCow, endBytes: Math.min(end, next * cb) }
  }

  /** The kernel's info status word(s) for this snapshot, e.g. "16/204800 16" or "Invalid". */
  statusText(): string {
    if (this.condition === 'invalid') return 'Invalid'
    if (this.condition === 'merge-failed') return 'Merge failed'
    if (this.condition === 'overflow') return 'Overflow'
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
    const table = this.exceptions
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
    if (!valid) this.condition = 'invalid'
  }

  private get origin(): OriginBacking {
    if (!this.backing) throw new SnapError('SNAP_BAD_ARGUMENT', `${this.name} is not attached to an origin`)
    return this.backing
  }

  // ---- used by the origin (and merge) to protect chunks -----------------------------------

  /**
   * Makes sure every chunk of this snapshot overlapping origin bytes [offset, end) is saved or
   * being saved, walking in this snapshot's chunk size with range queries: runs already saved
   * are skipped with one table query, runs being copied join their pending extent, and each run
   * of unsaved chunks becomes pending extents (one per run of consecutive COW chunks, capped at
   * COPY_RUN_BYTES). Tells `sink` what to wait for and hands it the copy of each extent
   * created, which the caller must start (even if a later snapshot throws). Invalidations
   * caused by a full COW go to `sink` too.
   */
  protectOrigin(offset: number, end: number, sink: ProtectSink): void {
    if (!this.attached || this.merging) return
    if (this.condition === 'invalid') {
      // Until the invalid header is durable a crash brings this snapshot back valid, so no
      // origin write it did not save may reach the device before then.
      if (this.invalidation && !this.invalidationDurable) sink.invalidation(this.invalidation)
      return
    }
    end = Math.min(end, this._sizeBytes)
    if (offset >= end) return
    const cb = this.chunkBytes
    const last = Math.floor((end - 1) / cb) + 1
    const maxRun = Math.max(1, Math.floor(COPY_RUN_BYTES / cb))
    let c = Math.floor(offset / cb)
    while (c < last) {
      const pe = this.pending.firstFrom(c)
      if (pe !== null && pe.firstChunk <= c) {
        sink.wait(pe)
        c = pe.firstChunk + pe.count
        continue
      }
      const gapEnd = pe !== null && pe.firstChunk < last ? pe.firstChunk : last
      c = this.exceptions.nextUnmapped(c, gapEnd)
      const runEnd = this.exceptions.nextMapped(c, gapEnd)
      // [c, runEnd): unsaved and not being copied; the loop then goes on from runEnd.
      while (c < runEnd) {
        let created: PendingException
        try {
          created = this.newPending(c, Math.min(runEnd - c, maxRun))
        } catch (err) {
          if (!isSnapError(err, 'SNAP_NO_SPACE')) throw err
          const extension = this.extensionForFullCow()
          // The origin write rescans once the extension settles (true: nothing to refuse).
          if (extension !== null) sink.wait(new ExtensionWait(extension))
          else sink.invalidation(this.invalidate(COW_FULL))
          return
        }
        sink.copy(this.originCopy(created))
        sink.wait(created)
        c += created.count
      }
    }
  }

  /**
   * One chunk's protectOriginChunk: the pending extent to wait for, or null when nothing is
   * (or can be) needed; starts the copy itself.
   */
  protectOriginChunk(offset: number, invalidations: Array<Promise<void>>): PendingException | null {
    const targets: CopyTarget[] = []
    this.protectOrigin(offset, offset + 1, { wait: () => {}, invalidation: (p) => invalidations.push(p), copy: (t) => targets.push(t) })
    if (targets.length > 0) this.origin.copies.copyOut(this.origin.device, targets)
    return this.pending.find(Math.floor(offset / this.chunkBytes))
  }

  /** Starts copying `started` from the origin device. */
  startCopies(started: readonly PendingException[]): void {
    if (started.length > 0) this.origin.copies.copyOut(this.origin.device, started.map((pe) => this.originCopy(pe)))
  }

  /** The copy engine's target for `pe`: origin bytes of the extent into its COW chunks. */
  private originCopy(pe: PendingException): CopyTarget {
    const cb = this.chunkBytes
    const from = pe.firstChunk * cb
    // The last origin chunk may be partial; the rest of its COW chunk is left as it is.
    return new OriginCopy(this, pe, from, Math.min((pe.firstChunk + pe.count) * cb, this.origin.sizeBytes) - from, pe.newChunk * cb)
  }

  /** @internal The copy of `pe` out of the origin ended (OriginCopy): commit or give it up. */
  originCopyEnded(pe: PendingException, failure: CopyFailure | null): void {
    this.finishPending(pe, failure === null ? true : copyFailure(failure.cause), true)
  }

  /** A pending extent of up to `maxCount` chunks from `firstChunk` (fewer where the COW is not consecutive). */
  private newPending(firstChunk: number, maxCount: number): PendingException {
    const prepared = this.store.prepareExceptions(firstChunk, maxCount)
    const pe = new PendingException(prepared)
    this.pending.insert(pe)
    this.inProgress += pe.count
    return pe
  }

  /**
   * Commit, publish and release a pending extent (kernel: pending_complete). Driven by the
   * store's commit callback: no promise per extent unless a tracked read has to be waited for.
   * `fromOrigin`: the extent was copied out of the origin (not written fresh by the snapshot's
   * own write).
   */
  private finishPending(pe: PendingException, copied: CopyResult, fromOrigin = false): void {
    this.inProgress -= pe.count
    this.wakeThrottled()
    if (copied instanceof SnapError) {
      void this.abandonPending(pe, copied)
      return
    }
    this.store.commitExceptionThen(pe.prepared, copied, (committed) => {
      if (!copied || !committed) {
        void this.invalidate(COW_IO_ERROR).then(() => this.releasePending(pe, false))
        return
      }
      if (this.condition === 'invalid') return this.releasePending(pe, false)
      const end = pe.firstChunk + pe.count
      this.exceptions.insertRun(pe.firstChunk, pe.newChunk, pe.count)
      // Published: later reads go to the COW. Reads of the origin that started before must end
      // before the origin write this copy protects may proceed.
      if (fromOrigin) this.copiedOut += pe.count
      if (this.trackedReads.overlaps(pe.firstChunk, end)) void this.trackedReads.drain(pe.firstChunk, end).then(() => this.releasePending(pe, true))
      else this.releasePending(pe, true)
    })
  }

  /** The end of pending_complete: the extent leaves the pending list and its waiters are told. */
  private releasePending(pe: PendingException, success: boolean): void {
    this.pending.remove(pe)
    this.origin.events.completed()
    if (success) {
      this.checkThreshold()
      if (this.outOfSpace) {
        this.outOfSpace = false
        this.emitter.emit('space-restored')
      }
    }
    // Last: a waiter may start new work at once.
    pe.settle(success)
  }

  /**
   * The copy could not get space: hand the extent back to the store unrecorded and settle with
   * the error. Its chunks stay unsaved, so the next write that needs them copies them again.
   */
  private async abandonPending(pe: PendingException, err: SnapError): Promise<void> {
    await this.store.abandonException(pe.prepared)
    this.pending.remove(pe)
    const failure = this.noSpaceError(err)
    if (!this.outOfSpace) {
      this.outOfSpace = true
      this.emitter.emit('no-space', failure)
    }
    // Settled before the global counter moves, so a merge woken by it sees the error.
    pe.settle(failure)
    this.origin.events.completed()
  }

  /** The error writes that needed an abandoned copy fail with: names the snapshot and the cause. */
  private noSpaceError(cause: SnapError): SnapError {
    return new SnapError('SNAP_NO_SPACE', `no space to save a chunk of snapshot ${this.snapshotName}: ${cause.message}`, {
      cause,
      details: { ...cause.details, snapshot: this.snapshotName },
    })
  }

  private checkThreshold(): void {
    const thresholdBytes = this.usageThresholdBytes
    if (thresholdBytes === null) return
    const allocatedBytes = this.store.usage().allocatedSectors * SECTOR_BYTES
    if (allocatedBytes >= thresholdBytes) {
      this.usageThresholdBytes = null
      this.emitter.emit('threshold', { allocatedBytes, thresholdBytes })
    }
  }

  /** Null when at most COW_THRESHOLD chunks are being copied, else a promise for a wake-up. */
  belowThresholdWait(): Promise<void> | null {
    if (this.inProgress <= COW_THRESHOLD) return null
    this.throttled ??= deferred<void>()
    return this.throttled.promise
  }

  private wakeThrottled(): void {
    if (this.inProgress > COW_THRESHOLD || this.throttled === null) return
    const throttled = this.throttled
    this.throttled = null
    // Its waiters resume in the order they started waiting, as one promise per waiter did.
    throttled.resolve()
  }

  /**
   * The origin chunks that have a complete exception, as sorted, non-overlapping, maximal ranges
   * [startChunk, endChunk): exactly where this snapshot's view may differ from the origin's
   * (elsewhere it reads the origin). Cost is in the table's runs, not the origin's size: one
   * native numeric sort of (first chunk, run length) keys, then one merge pass.
   */
  exceptionRanges(): ChunkRange[] {
    // old < 2^44 and count < 256, so old * 256 + count < 2^52 stays an exact double
    const keys = new Float64Array(this.table.runCount)
    let n = 0
    for (const run of this.table.runs()) keys[n++] = run.old * 256 + run.count
    keys.sort()
    const ranges: ChunkRange[] = []
    for (let i = 0; i < n; i++) {
      const key = keys[i]!
      const count = key % 256
      const startChunk = (key - count) / 256
      const endChunk = startChunk + count + 1
      const last = ranges[ranges.length - 1]
      if (last && last.endChunk === startChunk) last.endChunk = endChunk
      else ranges.push({ startChunk, endChunk })
    }
    return ranges
  }

  /** Waits until no pending extent of this snapshot is in flight (kernel destructor). */
  async drainPending(): Promise<void> {
    while (this.pending.size > 0) {
      await Promise.all(this.pending.values().map((pe) => pe.done))
    }
  }

  // ---- the snapshot's own view (BlockDevice hooks) ----------------------------------------

  private checkUsable(write: boolean): void {
    if (this.condition === 'invalid') throw new SnapError('SNAP_INVALID', `${this.name} is invalid`)
    if (this.merging) throw new SnapError('SNAP_INVALID', `${this.name} is being merged into its origin`)
    if (write && this.condition === 'overflow') throw new SnapError('SNAP_OVERFLOW', `${this.name} has overflowed`)
  }

  /**
   * One COW read per run of saved chunks consecutive in the COW, one origin read per run of
   * unsaved chunks (tracked as one range until it ends); when saved and unsaved runs
   * interleave, one origin read over the whole request with the COW runs on top.
   */
  protected async _readInto(target: Uint8Array, offset: number): Promise<void> {
    this.checkUsable(false)
    const cb = this.chunkBytes
    const end = offset + target.length
    const firstChunk = Math.floor(offset / cb)
    const endChunk = Math.floor((end - 1) / cb) + 1
    const table = this.exceptions
    // Fast path: nothing saved in the range (every first read of an unchanged area).
    if (table.nextMapped(firstChunk, endChunk) === endChunk) return this.readOriginTracked(target, offset, firstChunk, endChunk)
    // cow holds [targetStart, targetEnd, cowOffset] triples; origin pieces [start, end) bytes.
    const cow: number[] = []
    const originPieces: number[] = []
    let c = firstChunk
    while (c < endChunk) {
      const pos = Math.max(offset, c * cb)
      const run = table.mappedRun(c, endChunk)
      if (run !== null) {
        const runEnd = Math.min(end, (c + run.count) * cb)
        cow.push(pos - offset, runEnd - offset, run.cow * cb + (pos - c * cb))
        c += run.count
      } else {
        const next = table.nextMapped(c, endChunk)
        originPieces.push(pos, Math.min(end, next * cb))
        c = next
      }
    }
    if (originPieces.length > 2) {
      // Fragmented: one origin read over the whole range, then the saved runs on top, instead
      // of one small read per piece. Tracking the saved chunks too is harmless: nobody waits
      // on a chunk whose exception is already complete.
      await this.readOriginTracked(target, offset, firstChunk, endChunk)
      await settleAll(this.cowReads(target, cow))
      return
    }
    const jobs = this.cowReads(target, cow)
    if (originPieces.length === 2) {
      const [a, b] = originPieces as [number, number]
      jobs.push(this.readOriginTracked(target.subarray(a - offset, b - offset), a, Math.floor(a / cb), Math.floor((b - 1) / cb) + 1))
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

  private async readOriginTracked(target: Uint8Array, offset: number, firstChunk: number, endChunk: number): Promise<void> {
    const tracked = this.trackedReads.add(firstChunk, endChunk)
    try {
      await this.origin.device.readInto(target, offset)
    } finally {
      this.trackedReads.remove(tracked)
    }
  }

  /**
   * Snapshot writes, coalesced: one COW write per run of saved chunks consecutive in the COW;
   * whole unsaved chunks become pending extents written straight from the request (the write
   * is the copy, no origin read); a partly written unsaved chunk is copied first. FUA is
   * honoured once per request: on the only COW write, or by one flush after all of them.
   */
  protected async _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    this.checkUsable(true)
    for (let wait = this.belowThresholdWait(); wait; wait = this.belowThresholdWait()) await wait
    this.checkUsable(true)
    const cb = this.chunkBytes
    const end = offset + data.length
    const endChunk = Math.floor((end - 1) / cb) + 1
    const cowWrites: Array<[Uint8Array, number]> = []
    const fresh: Array<Promise<void>> = []
    try {
      let pos = offset
      while (pos < end) {
        const c = Math.floor(pos / cb)
        const pe = this.pending.find(c)
        if (pe !== null) {
          await this.outcomeOf(pe, 'copy failed')
          continue // look again: the chunk is saved now
        }
        const run = this.exceptions.mappedRun(c, endChunk)
        if (run !== null) {
          const runEnd = Math.min(end, (c + run.count) * cb)
          cowWrites.push([data.subarray(pos - offset, runEnd - offset), run.cow * cb + (pos - c * cb)])
          pos = runEnd
          continue
        }
        const next = this.pending.firstFrom(c)
        const gapEnd = this.exceptions.nextMapped(c, next !== null && next.firstChunk < endChunk ? next.firstChunk : endChunk)
        const wholeEnd = Math.min(gapEnd, Math.floor(end / cb))
        if (pos !== c * cb || wholeEnd <= c) {
          // A partly written chunk: its old data is copied first, then the write goes on top.
          const copy = this.pendingForWrite(c, 1)
          if (!(copy instanceof PendingException)) {
            await copy // the COW is being extended: look again once it is
            continue
          }
          this.startCopies([copy])
          await this.outcomeOf(copy, 'copy failed')
          continue
        }
        // Whole unsaved chunks: the request's bytes are the copy.
        while (pos < wholeEnd * cb) {
          const first = pos / cb
          const pe = this.pendingForWrite(first, Math.min(wholeEnd - first, Math.max(1, Math.floor(COPY_RUN_BYTES / cb))))
          if (!(pe instanceof PendingException)) {
            await pe
            break
          }
          fresh.push(this.writeFresh(pe, data.subarray(pos - offset, pos - offset + pe.count * cb)))
          pos += pe.count * cb
        }
      }
    } catch (err) {
      await Promise.allSettled(fresh)
      if (this.invalidation) await this.invalidation
      throw err
    }
    const jobs = fresh
    const oneWrite = cowWrites.length === 1 && fresh.length === 0
    for (const [piece, at] of cowWrites) jobs.push(this.store.cow.write(piece, at, { fua: fua && oneWrite }))
    await settleAll(jobs)
    if (fua && !oneWrite) await this.store.cow.flush()
  }

  /**
   * A new pending extent for the snapshot's own write; a full COW being extended returns the
   * extension to wait for, else it overflows or invalidates.
   */
  private pendingForWrite(firstChunk: number, maxCount: number): PendingException | Promise<void> {
    try {
      return this.newPending(firstChunk, maxCount)
    } catch (err) {
      if (!isSnapError(err, 'SNAP_NO_SPACE')) throw err
      const extension = this.extensionForFullCow()
      if (extension !== null) return extension
      if (this.overflowMode) {
        this.markOverflowed()
        throw new SnapError('SNAP_OVERFLOW', `${this.name} overflowed: unable to allocate exception`)
      }
      // _write awaits the invalidation before it reports the error, so it is durable by then.
      void this.invalidate(COW_FULL)
      throw new SnapError('SNAP_INVALID', `${this.name} invalidated: COW device is full`)
    }
  }

  /** Writes whole fresh chunks into `pe`'s COW chunks and commits them. */
  private async writeFresh(pe: PendingException, data: Uint8Array): Promise<void> {
    let copied: CopyResult = true
    try {
      await this.store.whenSpaceReady(pe.prepared)
      await this.store.cow.write(data, pe.newChunk * this.chunkBytes)
    } catch (err) {
      copied = copyFailure(err)
    }
    this.finishPending(pe, copied)
    await this.outcomeOf(pe, 'COW write failed')
  }

  /** Throws unless `pe` saved its chunks. */
  private async outcomeOf(pe: PendingException, failure: string): Promise<void> {
    const outcome = await pe.done
    if (outcome instanceof SnapError) throw outcome
    if (!outcome) throw new SnapError('SNAP_INVALID', `${this.name} invalidated: ${failure}`)
    this.checkUsable(true)
  }

  protected async _flush(): Promise<void> {
    // Flushes succeed even on an invalid snapshot, as in the kernel.
    await this.store.cow.flush()
  }

  protected override async _discard(offset: number, length: number): Promise<void> {
    this.checkUsable(true)
    const cb = this.chunkBytes
    const end = offset + length
    const endChunk = Math.floor((end - 1) / cb) + 1
    const jobs: Array<Promise<void>> = []
    if (this.discardPassdownOrigin && this.origin.device.capabilities.discard) {
      // Deliberately frees origin space without saving it anywhere (kernel semantics).
      jobs.push(this.discardOriginTracked(offset, length, Math.floor(offset / cb), endChunk))
    }
    // Saved runs are zeroed in the COW; unsaved chunks need nothing, and get no exception.
    const table = this.exceptions
    for (let c = table.nextMapped(Math.floor(offset / cb), endChunk); c < endChunk; ) {
      const run = table.mappedRun(c, endChunk) as { cow: number; count: number }
      const pos = Math.max(offset, c * cb)
      const runEnd = Math.min(end, (c + run.count) * cb)
      const cowOffset = run.cow * cb + (pos - c * cb)
      const n = runEnd - pos
      if (pos % cb === 0 && runEnd % cb === 0) {
        jobs.push(this.store.cow.write(new Uint8Array(n), cowOffset))
      } else if (this.store.cow.capabilities.discard) {
        jobs.push(this.store.cow.discard(cowOffset, n))
      } else {
        jobs.push(this.store.cow.write(new Uint8Array(n), cowOffset))
      }
      c = table.nextMapped(c + run.count, endChunk)
    }
    await settleAll(jobs)
  }

  private async discardOriginTracked(offset: number, length: number, firstChunk: number, endChunk: number): Promise<void> {
    const tracked = this.trackedReads.add(firstChunk, endChunk)
    try {
      await this.origin.device.discard(offset, length)
    } finally {
      this.trackedReads.remove(tracked)
    }
  }

  protected override async _close(): Promise<void> {
    await this.drainPending()
    await this.store.close()
  }
}

/**
 * The copy of one pending extent out of the origin, as the copy engine's target: a class with
 * methods, not an object of closures, since every first-touch write makes one.
 */
class OriginCopy implements CopyTarget {
  readonly from: number
  readonly length: number
  readonly to: number
  private readonly snapshot: Snapshot
  private readonly pe: PendingException

  constructor(snapshot: Snapshot, pe: PendingException, from: number, length: number, to: number) {
    this.snapshot = snapshot
    this.pe = pe
    this.from = from
    this.length = length
    this.to = to
  }

  get device(): BlockDevice {
    return this.snapshot.store.cow
  }

  prepare(ready: (err: unknown) => void): void {
    this.snapshot.store.whenSpaceReadyThen(this.pe.prepared, ready)
  }

  done(failure: CopyFailure | null): void {
    this.snapshot.originCopyEnded(this.pe, failure)
  }
}

/** How a copy went: true (landed), false (I/O error), or the SNAP_NO_SPACE error that stopped it. */
type CopyResult = boolean | SnapError

function copyFailure(err: unknown): CopyResult {
  return isSnapError(err, 'SNAP_NO_SPACE') ? err : false
}

/** Waits for every job, then rethrows the first failure (no unobserved rejections). */
export async function settleAll(jobs: Array<Promise<void>>): Promise<void> {
  if (jobs.length === 1) return jobs[0]
  const results = await Promise.allSettled(jobs)
  for (const r of results) if (r.status === 'rejected') throw r.reason
}
