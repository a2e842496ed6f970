/**
 * Volume: a directory holding an origin image, one kernel-format COW file per persistent
 * snapshot and a manifest, opened as an Origin with its Snapshots. The Volume owns the
 * directory (VolumeLock) for as long as it is open.
 *
 * Snapshot names follow ZFS/RBD style devices: `VOL` is the origin, `VOL@SNAP` a snapshot.
 * Transient snapshots keep their data in a COW file too, but their table lives in memory: they
 * exist only while this process has the volume open, and are dropped at the next open.
 */
import { constants } from 'node:fs'
import { copyFile, mkdir, rm, stat } from 'node:fs/promises'
import { basename, join, resolve } from 'node:path'
import { FileDevice } from '../device/file-device.js'
import { SnapError, badArgument, isSnapError } from '../errors.js'
import { decodeHeader } from '../format/header.js'
import { ExceptionEvents, defaultExceptionEvents } from '../snapshot/exception-events.js'
import { Origin } from '../snapshot/origin.js'
import { Snapshot, type SnapshotState } from '../snapshot/snapshot.js'
import type { ExceptionStore } from '../store/exception-store.js'
import { type Merge, type MergeOptions, startMerge } from '../merge/merge.js'
import { PersistentStore } from '../store/persistent-store.js'
import { TransientStore } from '../store/transient-store.js'
import { DEFAULT_CHUNK_BYTES, SECTOR_BYTES, checkChunkSizeBytes } from '../units.js'
import {
  type Manifest,
  type SnapshotRecord,
  type StoreName,
  MANIFEST_VERSION,
  SNAPSHOT_DIR,
  cowPathOf,
  isExternal,
  readManifest,
  writeManifest,
} from './manifest.js'
import { openVolumeFile, removeVolumeFile, resolveInside } from './volume-files.js'
import { VolumeLock } from './volume-lock.js'

export { SNAPSHOT_DIR }
export const ORIGIN_FILE = 'origin.img'

const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$/

export function checkSnapshotName(name: string): void {
  if (!NAME_PATTERN.test(name)) {
    throw badArgument(`invalid snapshot name '${name}' (letters, digits, _ . + -; at most 64; not starting with a symbol)`)
  }
}

export interface CreateVolumeOptions {
  readonly sizeBytes?: number
  /** Copy this image as the origin (its size becomes the volume size). */
  readonly fromImage?: string
}

export interface VolumeOpenOptions {
  readonly events?: ExceptionEvents
  /** Origin write-back limit in bytes (Origin's default when absent; 0: off). */
  readonly writeBackBytes?: number
}

export interface SnapshotCreateOptions {
  readonly chunkSizeBytes?: number
  readonly store?: StoreName
  readonly overflow?: boolean
  /** Fixed COW size (kernel behaviour); absent: the COW file grows on demand. */
  readonly cowSizeBytes?: number
  readonly usageThresholdBytes?: number
}

export interface SnapshotInfo {
  readonly name: string
  readonly chunkSizeBytes: number
  readonly store: StoreName
  readonly overflow: boolean
  readonly cowPath: string
  readonly cowSizeBytes: number
  readonly allocatedBytes: number
  readonly metadataBytes: number
  readonly state: SnapshotState
}

export interface VolumeInfo {
  readonly name: string
  readonly path: string
  readonly sizeBytes: number
  readonly originPath: string
  readonly snapshots: SnapshotInfo[]
  readonly merge: { snapshot: string; doneChunks: number; totalChunks: number } | null
}

export class Volume {
  readonly dir: string
  readonly origin: Origin
  private manifest: Manifest
  private readonly lock: VolumeLock
  private readonly snapshotsByName = new Map<string, Snapshot>()
  private closed = false
  /** The merge running on this volume, if any. */
  private runningMerge: Merge | null = null

  private constructor(dir: string, manifest: Manifest, lock: VolumeLock, origin: Origin) {
    this.dir = dir
    this.manifest = manifest
    this.lock = lock
    this.origin = origin
  }

  get name(): string {
    return basename(this.dir)
  }

  get sizeBytes(): number {
    return this.manifest.sizeBytes
  }

  get records(): readonly SnapshotRecord[] {
    return this.manifest.snapshots
  }

  get pendingMerge(): string | null {
    return this.manifest.merge?.snapshot ?? null
  }

  static async create(dirPath: string, options: CreateVolumeOptions): Promise<void> {
    const dir = resolve(dirPath)
    const exists = await stat(dir).then(
      () => true,
      () => false,
    )
    if (exists) throw new SnapError('SNAP_EXISTS', `${dir} already exists`, { details: { path: dir } })
    let sizeBytes: number
    if (options.fromImage !== undefined) {
      const st = await stat(options.fromImage).catch(() => null)
      if (!st || !st.isFile()) throw new SnapError('SNAP_NOT_FOUND', `image ${options.fromImage} does not exist`)
      sizeBytes = st.size
    } else {
      sizeBytes = options.sizeBytes ?? 0
    }
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % SECTOR_BYTES !== 0) {
      throw badArgument(`volume size ${sizeBytes} must be a positive multiple of 512 bytes`)
    }
    await mkdir(dir, { recursive: false })
    try {
      await mkdir(join(dir, SNAPSHOT_DIR))
      if (options.fromImage !== undefined) {
        await copyFile(options.fromImage, join(dir, ORIGIN_FILE))
      } else {
        const dev = await FileDevice.open(join(dir, ORIGIN_FILE), { create: sizeBytes })
        await dev.close()
      }
      await writeManifest(dir, { version: MANIFEST_VERSION, sizeBytes, originFile: ORIGIN_FILE, snapshots: [], merge: null })
    } catch (err) {
      await rm(dir, { recursive: true, force: true })
      throw err
    }
  }

  static async open(dirPath: string, options: VolumeOpenOptions = {}): Promise<Volume> {
    const dir = resolve(dirPath)
    const manifest = await readManifest(dir)
    const lock = await VolumeLock.acquire(dir)
    let originDev: FileDevice | null = null
    try {
      originDev = await openVolumeFile(dir, manifest.originFile)
      if (originDev.sizeBytes !== manifest.sizeBytes) {
        throw new SnapError('SNAP_CORRUPT_METADATA', `origin image is ${originDev.sizeBytes} bytes, manifest says ${manifest.sizeBytes}`)
      }
      const origin = new Origin(originDev, {
        name: basename(dir),
        events: options.events ?? defaultExceptionEvents,
        ...(options.writeBackBytes === undefined ? {} : { writeBackBytes: options.writeBackBytes }),
      })
      const volume = new Volume(dir, manifest, lock, origin)
      await volume.attachRecorded()
      await volume.resumeRecordedMerge()
      return volume
    } catch (err) {
      if (originDev && !originDev.closed) await originDev.close()
      await lock.release()
      throw err
    }
  }

  private async attachRecorded(): Promise<void> {
    const kept: SnapshotRecord[] = []
    for (const record of this.manifest.snapshots) {
      if (record.store === 'transient') {
        // Its table died with the process that made it.
        if (!isExternal(record)) await removeVolumeFile(this.dir, record.cowFile)
        continue
      }
      const snap = await this.openSnapshot(record, false)
      this.snapshotsByName.set(record.name, snap)
      kept.push(record)
    }
    if (kept.length !== this.manifest.snapshots.length) await this.saveManifest({ ...this.manifest, snapshots: kept })
  }

  cowPath(record: SnapshotRecord): string {
    return cowPathOf(this.dir, record)
  }

  private async openSnapshot(record: SnapshotRecord, create: boolean): Promise<Snapshot> {
    const growable = record.cowSizeBytes === null
    const path = this.cowPath(record)
    const options = create ? { create: record.cowSizeBytes ?? 0, resizable: growable } : { resizable: growable }
    const cow = isExternal(record) ? await FileDevice.open(path, options) : await openVolumeFile(this.dir, record.cowFile, options)
    let store: ExceptionStore
    try {
      // A recorded persistent snapshot always has a header: never re-initialise a truncated or zeroed COW.
      if (!create && record.store === 'persistent' && (cow.sizeBytes < SECTOR_BYTES || decodeHeader(await cow.read(0, SECTOR_BYTES)).kind !== 'existing')) {
        throw new SnapError('SNAP_CORRUPT_METADATA', `${path} has no snapshot header (truncated or overwritten)`)
      }
      store =
        record.store === 'persistent'
          ? new PersistentStore(cow, { chunkBytes: record.chunkSizeBytes, growable })
          : new TransientStore(cow, { chunkBytes: record.chunkSizeBytes, growable })
      const snap = new Snapshot({ name: record.name, store, overflow: record.overflow })
      await this.origin.addSnapshot(snap)
      return snap
    } catch (err) {
      if (!cow.closed) await cow.close()
      throw err
    }
  }

  private async saveManifest(next: Manifest): Promise<void> {
    await writeManifest(this.dir, next)
    this.manifest = next
  }

  async setPendingMerge(snapshot: string | null): Promise<void> {
    await this.saveManifest({ ...this.manifest, merge: snapshot === null ? null : { snapshot } })
  }

  snapshot(name: string): Snapshot {
    const snap = this.snapshotsByName.get(name)
    if (!snap) throw new SnapError('SNAP_NOT_FOUND', `no snapshot '${name}' in volume ${this.name}`)
    return snap
  }

  record(name: string): SnapshotRecord {
    const record = this.manifest.snapshots.find((r) => r.name === name)
    if (!record) throw new SnapError('SNAP_NOT_FOUND', `no snapshot '${name}' in volume ${this.name}`)
    return record
  }

  /** The device for `VOL` (null or '' snapshot) or `VOL@SNAP`. */
  device(snapshot: string | null): Origin | Snapshot {
    return snapshot ? this.snapshot(snapshot) : this.origin
  }

  async createSnapshot(name: string, options: SnapshotCreateOptions = {}): Promise<Snapshot> {
    checkSnapshotName(name)
    if (this.manifest.snapshots.some((r) => r.name === name)) {
      throw new SnapError('SNAP_EXISTS', `snapshot '${name}' already exists in volume ${this.name}`)
    }
    const chunkSizeBytes = options.chunkSizeBytes ?? DEFAULT_CHUNK_BYTES
    checkChunkSizeBytes(chunkSizeBytes)
    const store = options.store ?? 'persistent'
    if (options.overflow && store !== 'persistent') throw badArgument('--overflow applies to persistent snapshots only')
    const cowSizeBytes = options.cowSizeBytes ?? null
    if (cowSizeBytes !== null) {
      const minimum = store === 'persistent' ? 3 * chunkSizeBytes : chunkSizeBytes
      if (!Number.isSafeInteger(cowSizeBytes) || cowSizeBytes < minimum) {
        throw badArgument(`COW size ${cowSizeBytes} is too small for chunk size ${chunkSizeBytes} (at least ${minimum})`)
      }
    }
    const record: SnapshotRecord = {
      name,
      chunkSizeBytes,
      store,
      overflow: options.overflow === true,
      cowFile: join(SNAPSHOT_DIR, `${name}.cow`),
      cowSizeBytes,
      createdAt: new Date().toISOString(),
    }
    await removeVolumeFile(this.dir, record.cowFile) // leftover of a crash between file creation and manifest write
    let snap: Snapshot
    try {
      snap = await this.openSnapshot(record, true)
    } catch (err) {
      await removeVolumeFile(this.dir, record.cowFile).catch(() => {})
      throw err
    }
    this.snapshotsByName.set(name, snap)
    await this.saveManifest({ ...this.manifest, snapshots: [...this.manifest.snapshots, record] })
    return snap
  }

  /** Adopts a kernel-format persistent COW made for this origin. */
  async importSnapshot(name: string, cowFile: string, options: { inPlace?: boolean } = {}): Promise<Snapshot> {
    checkSnapshotName(name)
    if (this.manifest.snapshots.some((r) => r.name === name)) {
      throw new SnapError('SNAP_EXISTS', `snapshot '${name}' already exists in volume ${this.name}`)
    }
    const source = resolve(cowFile)
    const st = await stat(source).catch(() => null)
    if (!st || !st.isFile()) throw new SnapError('SNAP_NOT_FOUND', `COW file ${cowFile} does not exist`)
    const probe = await FileDevice.open(source, { readOnly: true })
    let chunkSizeBytes: number
    try {
      const header = decodeHeader(await probe.read(0, Math.min(512, probe.sizeBytes)))
      if (header.kind !== 'existing') throw new SnapError('SNAP_CORRUPT_METADATA', `${cowFile} has no snapshot header`)
      chunkSizeBytes = header.chunkSizeSectors * SECTOR_BYTES
      checkChunkSizeBytes(chunkSizeBytes)
    } finally {
      await probe.close()
    }
    const record: SnapshotRecord = {
      name,
      chunkSizeBytes,
      store: 'persistent',
      overflow: false,
      cowFile: options.inPlace ? source : join(SNAPSHOT_DIR, `${name}.cow`),
      ...(options.inPlace ? { external: true as const } : {}),
      cowSizeBytes: st.size,
      createdAt: new Date().toISOString(),
    }
    if (!isExternal(record)) {
      await removeVolumeFile(this.dir, record.cowFile)
      // Exclusive: never copy through a link planted at the destination.
      await copyFile(source, await resolveInside(this.dir, record.cowFile, false), constants.COPYFILE_EXCL)
    }
    let snap: Snapshot
    try {
      snap = await this.openSnapshot(record, false)
    } catch (err) {
      if (!isExternal(record)) await removeVolumeFile(this.dir, record.cowFile).catch(() => {})
      throw err
    }
    this.snapshotsByName.set(name, snap)
    await this.saveManifest({ ...this.manifest, snapshots: [...this.manifest.snapshots, record] })
    return snap
  }

  async removeSnapshot(name: string, options: { keepCow?: boolean } = {}): Promise<void> {
    const record = this.record(name)
    if (this.runningMerge?.snapshot.snapshotName === name || this.manifest.merge?.snapshot === name) {
      throw new SnapError('SNAP_BUSY', `snapshot '${name}' is being merged`)
    }
    const snap = this.snapshotsByName.get(name)
    if (snap) {
      await this.origin.removeSnapshot(snap)
      this.snapshotsByName.delete(name)
    }
    await this.saveManifest({ ...this.manifest, snapshots: this.manifest.snapshots.filter((r) => r.name !== name) })
    if (!options.keepCow && !isExternal(record)) await removeVolumeFile(this.dir, record.cowFile).catch(() => {})
  }

  /** Forgets a snapshot whose merge completed (its COW holds no exceptions any more). */
  async dropMergedSnapshot(name: string): Promise<void> {
    const record = this.record(name)
    this.snapshotsByName.delete(name)
    await this.saveManifest({ ...this.manifest, merge: null, snapshots: this.manifest.snapshots.filter((r) => r.name !== name) })
    if (!isExternal(record)) await removeVolumeFile(this.dir, record.cowFile).catch(() => {})
  }

  get merge(): Merge | null {
    return this.runningMerge
  }

  /**
   * Starts (or resumes) merging snapshot `name` into the origin. Recorded in the manifest first,
   * so a volume reopened after a crash resumes the merge and presents the merged view at once.
   */
  async startMerge(name: string, options: MergeOptions = {}): Promise<Merge> {
    const snap = this.snapshot(name)
    const current = this.runningMerge
    if (current && current.snapshot !== snap) {
      throw new SnapError('SNAP_MERGE_REFUSED', `snapshot '${current.snapshot.snapshotName}' is already merging`)
    }
    if (current && (current.state === 'running' || current.state === 'paused')) {
      if (options.rateBytesPerSecond !== undefined) current.setRate(options.rateBytesPerSecond)
      if (current.state === 'paused') current.resume()
      return current
    }
    if (this.manifest.merge && this.manifest.merge.snapshot !== name) {
      throw new SnapError('SNAP_MERGE_REFUSED', `snapshot '${this.manifest.merge.snapshot}' is already merging`)
    }
    if (this.record(name).store !== 'persistent') {
      throw new SnapError('SNAP_MERGE_REFUSED', 'Snapshot exception store does not support snapshot-merge.')
    }
    const merge = await startMerge(this.origin, snap, options)
    this.runningMerge = merge
    if (!this.manifest.merge) await this.setPendingMerge(name)
    const drop = () => {
      void this.dropMergedSnapshot(name).finally(() => {
        if (this.runningMerge === merge) this.runningMerge = null
      })
    }
    // A small merge can complete while the manifest is written, before a listener could see it.
    if (merge.state === 'complete') drop()
    else merge.once('complete', drop)
    return merge
  }

  private async resumeRecordedMerge(): Promise<void> {
    const name = this.manifest.merge?.snapshot
    if (!name) return
    if (!this.snapshotsByName.has(name)) {
      // The snapshot is gone (merge finished just before a crash): nothing left to merge.
      await this.setPendingMerge(null)
      return
    }
    await this.startMerge(name)
  }

  info(): VolumeInfo {
    const snapshots: SnapshotInfo[] = []
    for (const record of this.manifest.snapshots) {
      const snap = this.snapshotsByName.get(record.name)
      const usage = snap?.usage()
      snapshots.push({
        name: record.name,
        chunkSizeBytes: snap?.chunkBytes ?? record.chunkSizeBytes,
        store: record.store,
        overflow: record.overflow,
        cowPath: this.cowPath(record),
        cowSizeBytes: (usage?.totalSectors ?? 0) * SECTOR_BYTES,
        allocatedBytes: (usage?.allocatedSectors ?? 0) * SECTOR_BYTES,
        metadataBytes: (usage?.metadataSectors ?? 0) * SECTOR_BYTES,
        state: snap?.state ?? 'invalid',
      })
    }
    const running = this.runningMerge
    const progress = running?.progress()
    const merge = running && progress
      ? { snapshot: running.snapshot.snapshotName, doneChunks: progress.doneChunks, totalChunks: progress.totalChunks }
      : this.manifest.merge
        ? { snapshot: this.manifest.merge.snapshot, doneChunks: 0, totalChunks: 0 }
        : null
    return {
      name: this.name,
      path: this.dir,
      sizeBytes: this.manifest.sizeBytes,
      originPath: join(this.dir, this.manifest.originFile),
      snapshots,
      merge,
    }
  }

  /** The kernel's dmsetup status line for `VOL` or `VOL@SNAP`. */
  statusLine(snapshot: string | null): string {
    const sectors = Math.floor(this.manifest.sizeBytes / SECTOR_BYTES)
    if (!snapshot) {
      const merging = this.runningMerge?.snapshot
      if (merging) return `0 ${sectors} snapshot-merge ${merging.statusText()}`
      return `0 ${sectors} snapshot-origin`
    }
    const snap = this.snapshot(snapshot)
    if (snap.merging) return `0 ${sectors} snapshot Invalid`
    return `0 ${sectors} snapshot ${snap.statusText()}`
  }

  async flush(): Promise<void> {
    await this.origin.flush()
    for (const snap of this.snapshotsByName.values()) await snap.flush()
  }

  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    try {
      const merge = this.runningMerge
      if (merge && (merge.state === 'running' || merge.state === 'paused')) await merge.stop()
      await this.origin.close()
    } catch (err) {
      if (!isSnapError(err, 'SNAP_CLOSED')) throw err
    } finally {
      await this.lock.release()
    }
  }
}

/** Splits `VOL@SNAP` into its parts; `VOL` alone is the origin. */
export function parseDevice(spec: string): { volume: string; snapshot: string | null } {
  const at = spec.lastIndexOf('@')
  if (at === -1) return { volume: spec, snapshot: null }
  const volume = spec.slice(0, at)
  const snapshot = spec.slice(at + 1)
  if (!volume || !snapshot) throw badArgument(`bad device '${spec}': expected VOL or VOL@SNAP`)
  return { volume, snapshot }
}
