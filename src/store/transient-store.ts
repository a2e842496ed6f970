/**
 * TransientStore: the kernel's N store. Data chunks go to the COW device from chunk 0 upwards;
 * the table lives only in memory, so nothing survives a restart and merging is not possible.
 * A copy abandoned for want of space leaves its chunk unused.
 */
import type { BlockDevice } from '../device/block-device.js'
import { SnapError, noSpace } from '../errors.js'
import { SECTOR_BYTES, checkChunkSizeBytes } from '../units.js'
import type { ExceptionStore, MergeRun, PreparedException, StoreUsage } from './exception-store.js'
import { CowGrowth, growFixedCow, whenSpaceCovered } from './cow-growth.js'
import { type CommitDone, InOrderCommitter } from './in-order-committer.js'

export interface TransientStoreOptions {
  readonly chunkBytes: number
  readonly growable?: boolean
}

export class TransientStore implements ExceptionStore {
  readonly kind = 'transient'
  readonly supportsMerge = false
  readonly cow: BlockDevice
  readonly chunkBytes: number
  private readonly growable: boolean
  private _valid = true
  private nextFreeBytes = 0
  private recordedEndBytes = 0 // nextFreeBytes as if only recorded exceptions had been allocated
  private outstanding = 0 // prepared, not yet released by the committer
  private readonly growth: CowGrowth
  private readonly committer = new InOrderCommitter((e, kind, done) => {
    this.outstanding--
    if (kind === 'abandoned') {
      // Its chunk is handed out again once nothing allocated after it is outstanding.
      if (this.outstanding === 0) this.nextFreeBytes = this.recordedEndBytes
      return done(false)
    }
    this.recordedEndBytes = Math.max(this.recordedEndBytes, (e.newChunk + e.count) * this.chunkBytes)
    if (kind === 'failed') this._valid = false
    done(this._valid)
  })

  constructor(cow: BlockDevice, options: TransientStoreOptions) {
    if (!options.chunkBytes) throw new SnapError('SNAP_BAD_CHUNK_SIZE', 'chunk size not set')
    checkChunkSizeBytes(options.chunkBytes)
    this.cow = cow
    this.chunkBytes = options.chunkBytes
    this.growable = options.growable === true
    this.growth = new CowGrowth(cow, () => this.chunkBytes)
  }

  get valid(): boolean {
    return this._valid
  }

  async readMetadata(): Promise<{ valid: boolean }> {
    return { valid: true }
  }

  prepareException(oldChunk: number): PreparedException {
    return this.prepareExceptions(oldChunk, 1)
  }

  prepareExceptions(oldChunk: number, maxCount: number): PreparedException {
    let count = maxCount
    if (!this.growable) count = Math.min(count, Math.floor((this.cow.sizeBytes - this.nextFreeBytes) / this.chunkBytes))
    if (count < 1) throw noSpace(`COW device is full (${this.cow.sizeBytes} bytes)`)
    const needed = this.nextFreeBytes + count * this.chunkBytes
    if (needed > this.cow.sizeBytes) this.growth.request(needed)
    const newChunk = this.nextFreeBytes / this.chunkBytes
    this.nextFreeBytes = needed
    this.outstanding++
    return { oldChunk, newChunk, count, sequence: this.committer.allocateSequence() }
  }

  whenSpaceReady(e: PreparedException): Promise<void> {
    return new Promise((resolve, reject) => this.whenSpaceReadyThen(e, (err) => (err === null ? resolve() : reject(err))))
  }

  whenSpaceReadyThen(e: PreparedException, done: (err: unknown) => void): void {
    if (!this.growable) return done(null)
    const needed = (e.newChunk + e.count) * this.chunkBytes
    this.growth.request(needed) // again: an earlier step for it may have failed
    // Covered already (the usual case): no closure for whenCovers.
    if (this.growth.covers(needed)) return done(null)
    whenSpaceCovered(this.growth, needed, done)
  }

  commitException(e: PreparedException, ok: boolean): Promise<boolean> {
    return this.committer.commit(e, ok ? 'copied' : 'failed')
  }

  commitExceptionThen(e: PreparedException, ok: boolean, done: CommitDone): void {
    this.committer.commitThen(e, ok ? 'copied' : 'failed', done)
  }

  /** Nothing to record: the chunk stays an unused hole in the COW file. */
  async abandonException(e: PreparedException): Promise<void> {
    await this.committer.commit(e, 'abandoned')
  }

  mergeEntries(): number {
    return 0
  }

  prepareMerge(): Promise<MergeRun[]> {
    return Promise.reject(new SnapError('SNAP_MERGE_REFUSED', 'snapshot exception store does not support snapshot-merge'))
  }

  commitMerge(): Promise<void> {
    return Promise.reject(new SnapError('SNAP_MERGE_REFUSED', 'snapshot exception store does not support snapshot-merge'))
  }

  async dropSnapshot(): Promise<void> {
    this._valid = false
  }

  usage(): StoreUsage {
    return {
      allocatedSectors: this.nextFreeBytes / SECTOR_BYTES,
      totalSectors: Math.floor(this.cow.sizeBytes / SECTOR_BYTES),
      metadataSectors: 0,
    }
  }

  async growTo(sizeBytes: number): Promise<void> {
    await growFixedCow(this.cow, this.growable, sizeBytes, this.chunkBytes)
  }

  async close(): Promise<void> {
    await this.cow.close()
  }
}
