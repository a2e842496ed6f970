/**
 * Volume: a directory holding an origin image (or naming one used in place: external-origin.ts),
 * one kernel-format COW file per persistent snapshot and a manifest, opened as an Origin with its
 * Snapshots. The Volume owns the directory (VolumeLock; a lease on the cluster for a volume on a
 * shared store: ownership.ts), and an in-place origin (OriginLock), for
 * as long as it is open.
 *
 * Snapshot names follow ZFS/RBD style devices: `VOL` is the origin, `VOL@SNAP` a snapshot.
 * Transient snapshots keep their data in a COW file too, but their table lives in memory: they
 * exist only while this process has the volume open, and are dropped at the next open.
 */
import { EventEmitter } from 'node:events'
import { mkdir, rm, stat, statfs, unlink } from 'node:fs/promises'
import { basename, dirname, join, resolve } from 'node:path'
import type { BlockDevice } from '../device/block-device.js'
import { DeviceWindow } from '../device/device-window.js'
import { FileDevice, type FileDeviceOptions } from '../device/file-device.js'
import { InlineIo } from '../device/inline-io.js'
import { type ImageFile, copyImage, identityOfAddress, statAddress, statImage } from '../device/image-file.js'
import { checkNotUnknownUri, deviceUriIdentity, isDeviceUri, openDevice } from '../device/open-device.js'
import { SnapError, badArgument, isSnapError } from '../errors.js'
import { decodeHeader } from '../format/header.js'
import { ExceptionEvents, defaultExceptionEvents } from '../snapshot/exception-events.js'
import { Origin } from '../snapshot/origin.js'
import { Snapshot, type SnapshotState } from '../snapshot/snapshot.js'
import type { ExceptionStore } from '../store/exception-store.js'
import { type Merge, type MergeOptions, attachMergeView, startMerge } from '../merge/merge.js'
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
  isExternalOrigin,
  originPathOf,
  readManifest,
  writeManifest,
} from './manifest.js'
import { copyPrivate } from './private-copy.js'
import { openVolumeFile, removeVolumeFile, resolveInside } from './volume-files.js'
import { type OwnershipOptions, type VolumeOwnership, acquireOwnership, rbdImagesOf } from './ownership.js'
import { OriginLock, holdsCowHeader, openExternalOrigin, refuseAliasInUse, refuseVolumePart } from './external-origin.js'
import { claimOrigin, originOwner, releaseOrigin } from './origin-registry.js'
import { MAX_PROBLEMS, checkCow } from './check.js'
import { type AutoextendPolicy, FillWatch, type FillPolicy } from './fill-watch.js'
import { type VolumeEvent, fillPercent } from './volume-events.js'

export { SNAPSHOT_DIR }

/** Mode of a new volume directory and its snapshots/ directory: the owner's alone. */
export const VOLUME_DIR_MODE = 0o700
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
  /**
   * Use this image file, block device or device URI (an NBD export) as the origin where it is,
   * without copying it (its size becomes the volume size). blocksnap never deletes it.
   */
  readonly inPlaceOrigin?: string
}

export interface VolumeOpenOptions {
  readonly events?: ExceptionEvents
  /** Origin write-back limit in bytes (Origin's default when absent; 0: off). */
  readonly writeBackBytes?: number
  /** How a volume on a shared store (RBD origin) takes and keeps its lease (ownership.ts). */
  readonly ownership?: OwnershipOptions
}

export interface SnapshotCreateOptions {
  readonly chunkSizeBytes?: number
  readonly store?: StoreName
  readonly overflow?: boolean
  /** Fixed COW size (kernel behaviour); absent: the COW file grows on demand. */
  readonly cowSizeBytes?: number
  /**
   * Warn (a fill-threshold event) when the COW's fill reaches this percent, then every 5 % up
   * to 95 (dmeventd). Absent: 80 for a fixed-size COW, none for a grow-on-demand one (its fill
   * is measured against its size plus the file system's free space); null: none.
   */
  readonly warnAtPercent?: number | null
  /** Autoextend a fixed-size COW once its fill reaches this percent (100: never, as in LVM). */
  readonly autoextendThresholdPercent?: number
  /** By this percent of its size (default 20, as in LVM). */
  readonly autoextendPercent?: number
  /**
   * Put the COW on this device, in place (never deleted by blocksnap): a device URI, a block
   * device or an existing file, used fixed-size (its size, or `cowSizeBytes` of it); or a file
   * path that does not exist yet (or an empty file), made a COW that grows on demand (fixed at
   * `cowSizeBytes` when given). Refused when it already holds a COW header.
   */
  readonly cowDevice?: string
}

/** LVM's snapshot_autoextend_percent default. */
export const DEFAULT_AUTOEXTEND_PERCENT = 20
/** dmeventd's first warning for a fixed-size COW. */
export const DEFAULT_WARN_AT_PERCENT = 80

/** A snapshot's state in a listing: a Snapshot's own, or `broken` when its COW could not be attached. */
export type SnapshotListState = SnapshotState | 'broken'

export interface SnapshotInfo {
  readonly name: string
  /** When the snapshot was taken or imported (ISO 8601, UTC); null for a manifest that does not say. */
  readonly createdAt: string | null
  readonly chunkSizeBytes: number
  readonly store: StoreName
  readonly overflow: boolean
  /** The COW's device address: a path, or a device URI. */
  readonly cowPath: string
  /** The COW lives outside the volume (imported in place, or `snapshot --cow`): never deleted. */
  readonly cowExternal: boolean
  readonly cowSizeBytes: number
  readonly allocatedBytes: number
  readonly metadataBytes: number
  /**
   * What the COW can hold: its size when fixed; for a grow-on-demand COW, its size now plus the
   * free space of its file system (what it could still grow into).
   */
  readonly cowCapacityBytes: number
  /** The COW's fill, allocated against capacity (lvs Data%): 0 to 100. */
  readonly dataPercent: number
  /** The first fill warning level, or null for none. */
  readonly warnAtPercent: number | null
  /** Autoextend of a fixed-size COW, or null (it keeps its size). */
  readonly autoextend: AutoextendPolicy | null
  /** Share of the origin's chunks copied into the COW: 0 to 100. */
  readonly originPercent: number
  readonly state: SnapshotListState
  /**
   * Why the snapshot is broken (state `broken`), or why it became invalid while this process had
   * it open ('COW full', 'COW I/O error'); null otherwise.
   */
  readonly reason: string | null
}

export interface VolumeInfo {
  readonly name: string
  readonly path: string
  readonly sizeBytes: number
  /** The origin's device address: a path, or a device URI. */
  readonly originPath: string
  /** The origin is used in place (`create --origin`): never deleted. */
  readonly originExternal: boolean
  readonly snapshots: SnapshotInfo[]
  readonly merge: { snapshot: string; doneChunks: number; totalChunks: number } | null
}

export class Volume {
  readonly dir: string
  readonly origin: Origin
  private manifest: Manifest
  /** The directory's flock, or the lease of a volume on a shared store (ownership.ts). */
  private readonly lock: VolumeOwnership
  /** The flock on an in-place origin (external-origin.ts); null for the volume's own origin. */
  private readonly originLock: OriginLock | null
  private readonly snapshotsByName = new Map<string, Snapshot>()
  /**
   * Recorded snapshots whose COW could not be attached (corrupt, truncated, missing), with the
   * reason. They stay in the manifest, since the COW may be repairable; while any exists the
   * origin refuses writes and merges, which would change data their views need.
   */
  private readonly brokenByName = new Map<string, string>()
  private closed = false
  /** The merge running on this volume, if any. */
  private runningMerge: Merge | null = null
  /** The last manifest update in the chain (never rejects). */
  private manifestUpdates: Promise<void> = Promise.resolve()
  /** Fill warnings and autoextend of the attached snapshots, by name. */
  private readonly fillWatches = new Map<string, FillWatch>()
  private readonly eventEmitter = new EventEmitter()

  private constructor(dir: string, manifest: Manifest, lock: VolumeOwnership, originLock: OriginLock | null, origin: Origin) {
    this.dir = dir
    this.manifest = manifest
    this.lock = lock
    lock.trackImages?.(() => rbdImagesOf(this.manifest))
    this.originLock = originLock
    this.origin = origin
    this.forwardOriginNotices()
  }

  /**
   * Calls `listener` with every event of this volume (volume-events.ts), in order, until the
   * returned function is called. Listeners run synchronously: they must not block.
   */
  onEvent(listener: (event: VolumeEvent) => void): () => void {
    this.eventEmitter.on('event', listener)
    return () => this.eventEmitter.off('event', listener)
  }

  private emitEvent(event: VolumeEvent): void {
    this.eventEmitter.emit('event', event)
  }

  /** The origin's notices about its snapshots and write-back, as this volume's events. */
  private forwardOriginNotices(): void {
    const notices = this.origin.notices
    const base = (snap: Snapshot) => ({ volume: this.name, snapshot: snap.snapshotName })
    notices.on('invalidated', (snap: Snapshot, reason: string) => {
      this.emitEvent({ type: 'snapshot-invalidated', ...base(snap), reason, cowPath: this.cowPathOf(snap) })
    })
    notices.on('no-space', (snap: Snapshot, err: SnapError) => {
      const path = err.details?.path
      this.emitEvent({ type: 'snapshot-no-space', ...base(snap), cowPath: typeof path === 'string' ? path : this.cowPathOf(snap), reason: err.message })
    })
    notices.on('space-restored', (snap: Snapshot) => {
      this.emitEvent({ type: 'snapshot-space-restored', ...base(snap), cowPath: this.cowPathOf(snap) })
    })
    notices.on('write-back-failed', (e: { offsetBytes: number; lengthBytes: number; error: SnapError }) => {
      this.emitEvent({ type: 'write-back-failed', volume: this.name, offsetBytes: e.offsetBytes, lengthBytes: e.lengthBytes, code: e.error.code, reason: e.error.message })
    })
  }

  private cowPathOf(snap: Snapshot): string {
    const record = this.manifest.snapshots.find((r) => r.name === snap.snapshotName)
    return record ? this.cowPath(record) : 'its COW file'
  }

  /**
   * Settles once the fill work in flight is done: an autoextend and its manifest record. The
   * volume waits for it before closing; tests wait for it to look at the outcome.
   */
  async settled(): Promise<void> {
    for (const watch of this.fillWatches.values()) await watch.settled()
    await this.manifestUpdates
  }

  /** Reports, as fill-threshold events, the snapshots already past a warning level (serve, at start). */
  reportFill(): void {
    for (const watch of this.fillWatches.values()) watch.reportNow()
  }

  get name(): string {
    return basename(this.dir)
  }

  /**
   * 'lease' when the volume lives on a shared store and is owned through a lease on it, so its
   * directory's sockets and flock prove nothing about other hosts; 'flock' otherwise.
   */
  get ownedBy(): 'flock' | 'lease' {
    return this.lock.kind
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

  /** The recorded merge's rate limit in bytes/s; null: none (or no merge pending). */
  get pendingMergeRate(): number | null {
    return this.manifest.merge?.rateBytesPerSecond ?? null
  }

  static async create(dirPath: string, options: CreateVolumeOptions): Promise<void> {
    const dir = resolve(dirPath)
    const exists = await stat(dir).then(
      () => true,
      () => false,
    )
    if (exists) throw new SnapError('SNAP_EXISTS', `${dir} already exists`, { details: { path: dir } })
    const inPlace = options.inPlaceOrigin
    if (inPlace !== undefined) checkNotUnknownUri(inPlace)
    if (inPlace !== undefined) return isDeviceUri(inPlace) ? createOnUri(dir, inPlace) : createInPlace(dir, resolve(inPlace))
    let sizeBytes: number
    let image: ImageFile | null = null
    if (options.fromImage !== undefined) {
      image = await statImage(options.fromImage, 'image')
      sizeBytes = image.sizeBytes
    } else {
      sizeBytes = options.sizeBytes ?? 0
    }
    checkVolumeSize(sizeBytes)
    // Private by default (the umask can only narrow a mode): the directory gates the control
    // socket and every file in it. Sharing a volume is a chmod the owner makes on purpose.
    await mkdir(dir, { recursive: false, mode: VOLUME_DIR_MODE })
    try {
      await mkdir(join(dir, SNAPSHOT_DIR), { mode: VOLUME_DIR_MODE })
      if (options.fromImage !== undefined && image) {
        const from = options.fromImage
        await copyPrivate(join(dir, ORIGIN_FILE), (temp) => copyImage(from, image, temp))
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
    const lock = await acquireOwnership(dir, manifest, options.ownership)
    let originLock: OriginLock | null = null
    let originDev: BlockDevice | null = null
    try {
      if (isExternalOrigin(manifest) && isDeviceUri(manifest.originFile)) {
        const address = manifest.originFile
        const identity = deviceUriIdentity(address)
        // A leased volume's lease already excludes every other owner, on this host as on others;
        // a host-local lock would outlive a stalled owner and block its takeover.
        if (lock.kind !== 'lease') originLock = await OriginLock.acquireUri(address, identity, dir)
        await claimOrigin(identity, address, dir, { bestEffort: true })
        originDev = await openDevice(address)
      } else if (isExternalOrigin(manifest)) {
        const path = manifest.originFile
        const image = await statImage(path, 'origin').catch((err: unknown) => {
          if (!isSnapError(err, 'SNAP_NOT_FOUND')) throw err
          throw new SnapError('SNAP_NOT_FOUND', `origin ${path} of volume ${basename(dir)} does not exist`, { cause: err, details: { path } })
        })
        originLock = await OriginLock.acquire(path, image.identity, dir)
        // Refused when another volume uses it; recorded (or re-recorded after a move) otherwise.
        await claimOrigin(image.identity, path, dir, { bestEffort: true })
        originDev = await openExternalOrigin(path, image)
      } else {
        originDev = await openVolumeFile(dir, manifest.originFile)
      }
      if (originDev.sizeBytes !== manifest.sizeBytes) {
        const what = isExternalOrigin(manifest) ? `origin ${manifest.originFile}` : 'origin image'
        throw new SnapError('SNAP_CORRUPT_METADATA', `${what} is ${originDev.sizeBytes} bytes, manifest says ${manifest.sizeBytes}`)
      }
      const origin = new Origin(originDev, {
        name: basename(dir),
        events: options.events ?? defaultExceptionEvents,
        ...(options.writeBackBytes === undefined ? {} : { writeBackBytes: options.writeBackBytes }),
      })
      const volume = new Volume(dir, manifest, lock, originLock, origin)
      await volume.attachRecorded()
      await volume.presentRecordedMerge()
      volume.updateOriginRefusal()
      return volume
    } catch (err) {
      if (originDev && !originDev.closed) await originDev.close()
      await originLock?.release()
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
      kept.push(record)
      try {
        this.snapshotsByName.set(record.name, await this.openSnapshot(record, 'existing'))
      } catch (err) {
        // One bad COW must not take the origin and the other snapshots down with it.
        this.brokenByName.set(record.name, this.brokenReason(record, err))
      }
    }
    if (kept.length !== this.manifest.snapshots.length) await this.updateManifest((m) => ({ ...m, snapshots: kept }))
  }

  cowPath(record: SnapshotRecord): string {
    return cowPathOf(this.dir, record)
  }

  /** One line on why `record`'s COW could not be attached, naming the file as `VOL/snapshots/x.cow`. */
  private brokenReason(record: SnapshotRecord, err: unknown): string {
    const where = isExternal(record) ? record.cowFile : join(this.name, record.cowFile)
    if (isSnapError(err, 'SNAP_NOT_FOUND')) return `COW file ${where} is missing`
    const message = err instanceof Error ? err.message : String(err)
    return `${message.replace(/^invalid or corrupt snapshot: /, '')} in ${where}`
  }

  /** `VOL@SNAP`, as messages name a snapshot. */
  private deviceName(snapshot: string): string {
    return `${this.name}@${snapshot}`
  }

  /** The reason snapshot `name` is broken, or null when it is not (or does not exist). */
  broken(name: string): string | null {
    return this.brokenByName.get(name) ?? null
  }

  /** Why origin writes and merges are refused: the first broken snapshot and the way out (null: none is). */
  private brokenClause(): string | null {
    const first = this.brokenByName.entries().next()
    if (first.done) return null
    const [name, reason] = first.value
    const more = this.brokenByName.size - 1
    const others = more > 0 ? ` (and ${more} more broken snapshot${more === 1 ? '' : 's'})` : ''
    return `snapshot ${this.deviceName(name)} is broken (${reason})${others}; repair it, or drop it with \`blocksnap remove ${this.deviceName(name)} --force\``
  }

  /**
   * Puts the origin in the state the broken snapshots call for: writes refused while any
   * exists; reads refused too while a recorded merge cannot resume, since the device then
   * holds a mix of merged and unmerged chunks.
   */
  private updateOriginRefusal(): void {
    const broken = this.brokenClause()
    const pending = this.manifest.merge?.snapshot
    if (broken === null) this.origin.allowIo()
    else if (pending && !this.runningMerge) {
      this.origin.refuseIo(`origin of ${this.name} is unreadable: its merge of ${this.deviceName(pending)} cannot resume: ${broken}`)
    } else this.origin.refuseWrites(`origin writes are refused: ${broken}`)
  }

  /**
   * A new snapshot reads unsaved chunks from the origin device, which holds a partly merged
   * mix while a recorded merge waits for broken snapshots to be dealt with.
   */
  private checkOriginPresentable(): void {
    const pending = this.manifest.merge?.snapshot
    if (pending && !this.runningMerge && this.brokenByName.size > 0) {
      throw new SnapError('SNAP_BUSY', `cannot add a snapshot: ${this.name}'s merge of ${this.deviceName(pending)} waits for the broken snapshots to be repaired or removed`)
    }
  }

  /**
   * Opens `record`'s COW and attaches its snapshot. `how`: 'create' makes the volume's own COW
   * file, 'initialise' takes a prepared external COW with no header yet, 'existing' requires the
   * header a recorded persistent snapshot always has.
   */
  private async openSnapshot(record: SnapshotRecord, how: 'create' | 'initialise' | 'existing'): Promise<Snapshot> {
    const create = how === 'create'
    const growable = record.cowSizeBytes === null
    const path = this.cowPath(record)
    // A fixed-size COW with autoextend is resized by its FillWatch.
    const resizable = growable || (record.autoextend ?? null) !== null
    // The COW's writes stay on the thread pool, where the copy engine's combiner can merge them (inline-io.ts).
    const inlineWrites = InlineIo.poolOnly()
    const options = create ? { create: record.cowSizeBytes ?? 0, resizable, inlineWrites } : { resizable, inlineWrites }
    let cow: BlockDevice = isExternal(record) ? await openExternalCow(path, options) : await openVolumeFile(this.dir, record.cowFile, options)
    let store: ExceptionStore
    try {
      // A COW given a size on a larger device (`snapshot --cow DEV --cow-size`) sees that size.
      if (isExternal(record) && !resizable && record.cowSizeBytes !== null && cow.sizeBytes > record.cowSizeBytes) {
        cow = new DeviceWindow(cow, record.cowSizeBytes, path)
      }
      // A recorded persistent snapshot always has a header: never re-initialise a truncated or zeroed COW.
      if (how === 'existing' && record.store === 'persistent' && (cow.sizeBytes < SECTOR_BYTES || decodeHeader(await cow.read(0, SECTOR_BYTES)).kind !== 'existing')) {
        throw new SnapError('SNAP_CORRUPT_METADATA', `no snapshot header (truncated or overwritten)`, { details: { path } })
      }
      store =
        record.store === 'persistent'
          ? // Only the volume's own grow-on-demand COW file may shrink as a merge frees it.
            new PersistentStore(cow, { chunkBytes: record.chunkSizeBytes, growable, releaseMergedSpace: growable && !isExternal(record) })
          : new TransientStore(cow, { chunkBytes: record.chunkSizeBytes, growable })
      const snap = new Snapshot({ name: record.name, store, overflow: record.overflow })
      await this.origin.addSnapshot(snap)
      await this.watchFill(snap, record)
      return snap
    } catch (err) {
      if (!cow.closed) await cow.close()
      throw err
    }
  }

  private async watchFill(snap: Snapshot, record: SnapshotRecord): Promise<void> {
    const fixed = record.cowSizeBytes !== null
    const policy: FillPolicy = {
      warnAtPercent: record.warnAtPercent === undefined ? (fixed ? DEFAULT_WARN_AT_PERCENT : null) : record.warnAtPercent,
      autoextend: record.autoextend ?? null,
    }
    const name = record.name
    const cowPath = this.cowPath(record)
    const watch = new FillWatch(snap, policy, {
      volume: this.name,
      fixed,
      freeBytes: () => freeBytesBeside(cowPath),
      emit: (event) => this.emitEvent(event),
      grow: async (toBytes) => {
        const neededBytes = toBytes - snap.usage().totalSectors * SECTOR_BYTES
        const free = await freeBytesBeside(cowPath)
        // As lvextend refuses to extend past the VG's free extents: the COW file is sparse,
        // so a resize alone would succeed and the copies into it fail later instead.
        if (free < neededBytes) {
          throw new SnapError('SNAP_NO_SPACE', `the file system holding ${cowPath} has ${free} bytes free, ${neededBytes} needed`)
        }
        await snap.extendCow(toBytes)
      },
      recordSize: (toBytes) =>
        this.updateManifest((m) => ({ ...m, snapshots: m.snapshots.map((r) => (r.name === name ? { ...r, cowSizeBytes: toBytes } : r)) })),
    })
    await watch.start()
    this.fillWatches.set(name, watch)
  }

  private unwatchFill(name: string): void {
    this.fillWatches.get(name)?.stop()
    this.fillWatches.delete(name)
  }

  private async saveManifest(next: Manifest): Promise<void> {
    // A lease taken over while this process stalled: the new owner's manifest is not ours to write.
    await this.lock.assertHeld()
    await writeManifest(this.dir, next)
    this.manifest = next
  }

  /**
   * Read-modify-write of the manifest, after every earlier one; the only way the manifest
   * changes. Snapshot operations run at once on a served volume (a merge's end, which drops its
   * snapshot, a remove and a create from other clients, a rate change): each must start from
   * the others' result, or one undoes another (a removed snapshot listed again without its
   * COW), and two writes at once would share writeManifest's temporary file.
   */
  private updateManifest(change: (current: Manifest) => Manifest): Promise<void> {
    const update = this.manifestUpdates.then(() => this.saveManifest(change(this.manifest)))
    this.manifestUpdates = update.catch(() => {})
    return update
  }

  /** Records (or, with null, forgets) the pending merge and its rate limit (null: none). */
  async setPendingMerge(snapshot: string | null, rateBytesPerSecond: number | null = null): Promise<void> {
    await this.updateManifest((m) => ({ ...m, merge: snapshot === null ? null : { snapshot, rateBytesPerSecond } }))
  }

  snapshot(name: string): Snapshot {
    const snap = this.snapshotsByName.get(name)
    const broken = this.brokenByName.get(name)
    if (broken !== undefined) throw new SnapError('SNAP_CORRUPT_METADATA', `snapshot ${this.deviceName(name)} is broken: ${broken}`)
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
    this.checkOriginPresentable()
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
    if (options.cowDevice !== undefined) return this.createSnapshotOn(name, options.cowDevice, { ...options, chunkSizeBytes, store })
    const record: SnapshotRecord = {
      name,
      chunkSizeBytes,
      store,
      overflow: options.overflow === true,
      cowFile: join(SNAPSHOT_DIR, `${name}.cow`),
      cowSizeBytes,
      createdAt: new Date().toISOString(),
      ...fillOptions(options, cowSizeBytes !== null),
    }
    await removeVolumeFile(this.dir, record.cowFile) // leftover of a crash between file creation and manifest write
    let snap: Snapshot
    try {
      snap = await this.openSnapshot(record, 'create')
    } catch (err) {
      await removeVolumeFile(this.dir, record.cowFile).catch(() => {})
      throw err
    }
    this.snapshotsByName.set(name, snap)
    await this.updateManifest((m) => ({ ...m, snapshots: [...m.snapshots, record] }))
    return snap
  }

  /**
   * createSnapshot with the COW on device `address` (SnapshotCreateOptions.cowDevice), in place.
   * Like lvcreate over a device in use, refused when the device already holds a COW header (a
   * snapshot's, this volume's or another's) or is this volume's origin or another's.
   */
  private async createSnapshotOn(name: string, address: string, options: SnapshotCreateOptions & { chunkSizeBytes: number; store: StoreName }): Promise<Snapshot> {
    if (options.store !== 'persistent') throw badArgument('--cow applies to persistent snapshots only: a transient COW lives in the volume directory')
    if (options.autoextendThresholdPercent !== undefined && options.autoextendThresholdPercent !== 100) {
      throw badArgument('--autoextend-threshold does not apply to --cow: a COW on a given device keeps its size')
    }
    checkNotUnknownUri(address)
    const where = isDeviceUri(address) ? address : resolve(address)
    const identity = await identityOfAddress(where)
    if (identity !== null) {
      await this.refuseCowInUse(where, identity)
      const owner = await originOwner(identity)
      if (owner !== null) throw new SnapError('SNAP_BUSY', `COW ${where} is the origin of volume ${owner}`, { details: { path: where } })
    }
    // A file to make (or an empty one) grows on demand unless given a size; anything else has one.
    const image = identity === null || isDeviceUri(where) ? null : await statImage(where, 'COW')
    const fresh = identity === null || (image?.kind === 'file' && image.sizeBytes === 0)
    let cowSizeBytes = options.cowSizeBytes ?? null
    if (fresh) {
      if (identity === null) {
        // Made exclusively here; a fixed size is the file's size from the start.
        await (await FileDevice.open(where, { create: cowSizeBytes ?? 0 })).close()
      } else if (cowSizeBytes !== null) {
        const dev = await FileDevice.open(where, { resizable: true })
        await dev.resize(cowSizeBytes).finally(() => dev.close())
      }
    } else {
      cowSizeBytes = await prepareCowDevice(where, cowSizeBytes, options.chunkSizeBytes)
    }
    const minimum = 3 * options.chunkSizeBytes
    if (cowSizeBytes !== null && cowSizeBytes < minimum) {
      throw badArgument(`COW ${where} (${cowSizeBytes} bytes) is too small for chunk size ${options.chunkSizeBytes} (at least ${minimum})`)
    }
    const record: SnapshotRecord = {
      name,
      chunkSizeBytes: options.chunkSizeBytes,
      store: 'persistent',
      overflow: options.overflow === true,
      cowFile: where,
      external: true,
      cowSizeBytes,
      createdAt: new Date().toISOString(),
      ...fillOptions({ ...(options.warnAtPercent === undefined ? {} : { warnAtPercent: options.warnAtPercent }) }, cowSizeBytes !== null),
    }
    let snap: Snapshot
    try {
      snap = await this.openSnapshot(record, 'initialise')
    } catch (err) {
      // Only a file this call made is ours to take back.
      if (identity === null) await unlink(where).catch(() => {})
      throw err
    }
    this.snapshotsByName.set(name, snap)
    await this.updateManifest((m) => ({ ...m, snapshots: [...m.snapshots, record] }))
    return snap
  }

  /**
   * Adopts a kernel-format persistent COW made for this origin (a file or a block device). Refused
   * when the COW already backs a snapshot of this volume (two snapshots writing one COW corrupt
   * each other) and when its geometry or exceptions do not fit the origin (check's bounds check).
   */
  async importSnapshot(name: string, cowFile: string, options: { inPlace?: boolean } = {}): Promise<Snapshot> {
    checkSnapshotName(name)
    if (this.manifest.snapshots.some((r) => r.name === name)) {
      throw new SnapError('SNAP_EXISTS', `snapshot '${name}' already exists in volume ${this.name}`)
    }
    checkNotUnknownUri(cowFile)
    const source = isDeviceUri(cowFile) ? cowFile : resolve(cowFile)
    const image = await statAddress(source, 'COW')
    await this.refuseCowInUse(source, image.identity)
    const probe = await openDevice(source, { readOnly: true })
    let chunkSizeBytes: number
    try {
      const header = decodeHeader(await probe.read(0, Math.min(512, probe.sizeBytes)))
      if (header.kind !== 'existing') throw new SnapError('SNAP_CORRUPT_METADATA', `${cowFile} has no snapshot header`)
      chunkSizeBytes = header.chunkSizeSectors * SECTOR_BYTES
      checkChunkSizeBytes(chunkSizeBytes)
    } finally {
      await probe.close()
    }
    const problems = await checkCow(source, { originSizeBytes: this.sizeBytes, reportInvalid: false })
    if (problems.length > 0) {
      const count = problems.length > MAX_PROBLEMS ? `at least ${MAX_PROBLEMS}` : String(problems.length)
      const more = problems.length > 1 ? ` (${count} problems)` : ''
      throw new SnapError('SNAP_CORRUPT_METADATA', `COW ${cowFile} does not fit volume ${this.name}: ${problems[0]}${more}`)
    }
    const record: SnapshotRecord = {
      name,
      chunkSizeBytes,
      store: 'persistent',
      overflow: false,
      cowFile: options.inPlace ? source : join(SNAPSHOT_DIR, `${name}.cow`),
      ...(options.inPlace ? { external: true as const } : {}),
      cowSizeBytes: image.sizeBytes,
      createdAt: new Date().toISOString(),
    }
    // Into the volume's own snapshots/ directory, never through a link that leads out of it.
    if (!isExternal(record)) await copyPrivate(await resolveInside(this.dir, record.cowFile, false), (temp) => copyImage(source, image, temp))
    let snap: Snapshot
    try {
      snap = await this.openSnapshot(record, 'existing')
    } catch (err) {
      if (!isExternal(record)) await removeVolumeFile(this.dir, record.cowFile).catch(() => {})
      throw err
    }
    this.snapshotsByName.set(name, snap)
    await this.updateManifest((m) => ({ ...m, snapshots: [...m.snapshots, record] }))
    return snap
  }

  /**
   * Throws when `path` (storage `identity`) is the origin or a COW of this volume. A device URI
   * is the same storage as another when both name one export of one server.
   */
  private async refuseCowInUse(path: string, identity: string): Promise<void> {
    const originPath = originPathOf(this.dir, this.manifest)
    if (path === originPath || (await identityOfAddress(originPath)) === identity) {
      throw badArgument(`${path} is the origin of volume ${this.name}`)
    }
    for (const record of this.manifest.snapshots) {
      const used = this.cowPath(record)
      if (path === used || (await identityOfAddress(used)) === identity) {
        throw new SnapError('SNAP_BUSY', `COW ${path} is already used by snapshot '${record.name}' of volume ${this.name}`)
      }
    }
  }

  /**
   * Removes snapshot `name` and deletes its COW file if it lies inside the volume. A broken
   * snapshot is removed only with `force` (its COW may be repairable); that also drops a merge
   * of it that could not resume, leaving the origin with the chunks merged so far.
   */
  async removeSnapshot(name: string, options: { keepCow?: boolean; force?: boolean } = {}): Promise<void> {
    const record = this.record(name)
    const broken = this.brokenByName.get(name)
    if (broken !== undefined) return this.removeBrokenSnapshot(record, broken, options)
    if (this.runningMerge?.snapshot.snapshotName === name || this.manifest.merge?.snapshot === name) {
      throw new SnapError('SNAP_BUSY', `snapshot '${name}' is being merged`)
    }
    const snap = this.snapshotsByName.get(name)
    if (snap) {
      this.unwatchFill(name)
      await this.origin.removeSnapshot(snap)
      this.snapshotsByName.delete(name)
    }
    await this.updateManifest((m) => ({ ...m, snapshots: m.snapshots.filter((r) => r.name !== name) }))
    if (!options.keepCow && !isExternal(record)) await removeVolumeFile(this.dir, record.cowFile).catch(() => {})
  }

  private async removeBrokenSnapshot(record: SnapshotRecord, reason: string, options: { keepCow?: boolean; force?: boolean }): Promise<void> {
    const name = record.name
    // Only the volume's own COW is ours to delete, never an external one.
    const path = this.cowPath(record)
    const deletes = !options.keepCow && !isExternal(record)
    if (!options.force) {
      throw new SnapError(
        'SNAP_CORRUPT_METADATA',
        `snapshot ${this.deviceName(name)} is broken (${reason}); its COW file may be repairable, so it is kept: ` +
          `\`blocksnap remove ${this.deviceName(name)} --force\` drops it${deletes ? ` and deletes ${path}` : ''}`,
      )
    }
    await this.updateManifest((m) => ({
      ...m,
      merge: m.merge?.snapshot === name ? null : m.merge,
      snapshots: m.snapshots.filter((r) => r.name !== name),
    }))
    const merge = this.manifest.merge
    this.brokenByName.delete(name)
    if (deletes) await removeVolumeFile(this.dir, record.cowFile).catch(() => {})
    // The last broken snapshot gone, a recorded merge of a healthy one is presented again; it
    // moves on when asked (`merge VOL@SNAP`, or `serve` at its next start), as after any open.
    if (this.brokenByName.size === 0 && merge && !this.runningMerge) await this.presentRecordedMerge()
    this.updateOriginRefusal()
  }

  /** Forgets a snapshot whose merge completed (its COW holds no exceptions any more). */
  async dropMergedSnapshot(name: string): Promise<void> {
    const record = this.record(name)
    this.unwatchFill(name)
    this.snapshotsByName.delete(name)
    await this.updateManifest((m) => ({ ...m, merge: null, snapshots: m.snapshots.filter((r) => r.name !== name) }))
    if (!isExternal(record)) await removeVolumeFile(this.dir, record.cowFile).catch(() => {})
  }

  get merge(): Merge | null {
    return this.runningMerge
  }

  /**
   * Starts (or resumes) merging snapshot `name` into the origin. Recorded in the manifest (with
   * its rate limit) before the first chunk moves, so a volume reopened after a crash presents
   * the merged view at once; the merge itself goes on only when asked to again (resumeMerge,
   * or startMerge). Without `rateBytesPerSecond` a resumed merge keeps its recorded rate; with
   * it the new rate is recorded (0: no limit). The returned merge's `done` settles only once
   * the volume has forgotten a completed snapshot.
   */
  async startMerge(name: string, options: Omit<MergeOptions, 'onComplete'> = {}): Promise<Merge> {
    // Merging writes the origin, which the broken snapshots' views may still need.
    const broken = this.brokenClause()
    if (broken !== null) throw new SnapError('SNAP_MERGE_REFUSED', `merges are refused: ${broken}`)
    const snap = this.snapshot(name)
    const current = this.runningMerge
    if (current && current.snapshot !== snap) {
      throw new SnapError('SNAP_MERGE_REFUSED', `snapshot '${current.snapshot.snapshotName}' is already merging`)
    }
    if (current && (current.state === 'running' || current.state === 'paused')) {
      if (options.rateBytesPerSecond !== undefined) {
        current.setRate(options.rateBytesPerSecond)
        const rateBytesPerSecond = options.rateBytesPerSecond || null
        // Unless the merge ended meanwhile (its record is gone then).
        await this.updateManifest((m) => (m.merge?.snapshot === name ? { ...m, merge: { snapshot: name, rateBytesPerSecond } } : m))
      }
      if (current.state === 'paused') current.resume()
      return current
    }
    const recorded = this.manifest.merge
    if (recorded && recorded.snapshot !== name) {
      throw new SnapError('SNAP_MERGE_REFUSED', `snapshot '${recorded.snapshot}' is already merging`)
    }
    if (this.record(name).store !== 'persistent') {
      throw new SnapError('SNAP_MERGE_REFUSED', 'Snapshot exception store does not support snapshot-merge.')
    }
    const rate = options.rateBytesPerSecond === undefined ? (recorded?.rateBytesPerSecond ?? null) : options.rateBytesPerSecond || null
    if (!recorded || (recorded.rateBytesPerSecond ?? null) !== rate) await this.setPendingMerge(name, rate)
    let merge: Merge
    try {
      merge = await startMerge(this.origin, snap, {
        ...options,
        ...(rate === null ? {} : { rateBytesPerSecond: rate }),
        // Inside the merge, before it reports complete: a waiter never sees it complete while
        // the manifest still lists the snapshot.
        onComplete: () => this.dropMergedSnapshot(name),
      })
    } catch (err) {
      // Refused before anything moved: a merge that never started must not stay recorded.
      if (!recorded) await this.setPendingMerge(null)
      throw err
    }
    this.runningMerge = merge
    this.watchMerge(merge, rate)
    void merge.done.then(
      () => {
        if (this.runningMerge === merge && merge.state === 'complete') this.runningMerge = null
      },
      () => {},
    )
    return merge
  }

  /** Turns a merge's progress and end into events: started, every ten percent, done or failed. */
  private watchMerge(merge: Merge, rateBytesPerSecond: number | null): void {
    const base = { volume: this.name, snapshot: merge.snapshot.snapshotName }
    this.emitEvent({ type: 'merge-started', ...base, totalBytes: merge.progress().totalBytes, rateBytesPerSecond })
    let reportedTens = 0
    merge.on('progress', (p) => {
      if (p.totalBytes === 0) return
      const tens = Math.floor((10 * p.doneBytes) / p.totalBytes)
      if (tens <= reportedTens || tens >= 10) return
      reportedTens = tens
      const { doneBytes, totalBytes, rateBytesPerSecond: rate, etaSeconds } = p
      this.emitEvent({ type: 'merge-progress', ...base, percent: 10 * tens, doneBytes, totalBytes, rateBytesPerSecond: rate, etaSeconds })
    })
    merge.once('complete', () => this.emitEvent({ type: 'merge-done', ...base, totalBytes: merge.progress().totalBytes }))
    merge.once('failed', (err) => {
      this.emitEvent({ type: 'merge-failed', ...base, code: isSnapError(err) ? err.code : 'SNAP_IO', reason: err.message })
    })
  }

  /**
   * Resumes the merge recorded in the manifest, at its recorded rate (what `serve` does at
   * start); null when none is pending.
   */
  async resumeMerge(): Promise<Merge | null> {
    const name = this.manifest.merge?.snapshot
    // A merge waiting for broken snapshots stays recorded (startMerge would refuse it).
    if (!name || this.brokenByName.size > 0) return null
    return this.startMerge(name)
  }

  /**
   * A merge is recorded: the origin presents the merged view (reads and writes go through it),
   * but nothing is merged until someone resumes it: opening the volume for `list` or `read`
   * must not move data, nor at a rate the user did not choose.
   */
  private async presentRecordedMerge(): Promise<void> {
    const name = this.manifest.merge?.snapshot
    if (!name) return
    // Left recorded: it resumes once the broken snapshots are repaired or removed.
    if (this.brokenByName.size > 0) return
    const snap = this.snapshotsByName.get(name)
    if (!snap) {
      // The snapshot is gone (merge finished just before a crash): nothing left to merge.
      await this.setPendingMerge(null)
      return
    }
    await attachMergeView(this.origin, snap)
  }

  async info(): Promise<VolumeInfo> {
    const snapshots: SnapshotInfo[] = []
    for (const record of this.manifest.snapshots) {
      const snap = this.snapshotsByName.get(record.name)
      const broken = this.brokenByName.get(record.name)
      const usage = snap?.usage()
      const chunkSizeBytes = snap?.chunkBytes ?? record.chunkSizeBytes
      const cowSizeBytes = (usage?.totalSectors ?? 0) * SECTOR_BYTES
      const allocatedBytes = (usage?.allocatedSectors ?? 0) * SECTOR_BYTES
      const metadataBytes = (usage?.metadataSectors ?? 0) * SECTOR_BYTES
      const cowPath = this.cowPath(record)
      const cowCapacityBytes = record.cowSizeBytes === null ? cowSizeBytes + (await freeBytesBeside(cowPath)) : cowSizeBytes
      const originChunks = Math.ceil(this.manifest.sizeBytes / chunkSizeBytes)
      snapshots.push({
        name: record.name,
        createdAt: typeof record.createdAt === 'string' ? record.createdAt : null,
        chunkSizeBytes,
        store: record.store,
        overflow: record.overflow,
        cowPath,
        cowExternal: isExternal(record),
        cowSizeBytes,
        allocatedBytes,
        metadataBytes,
        cowCapacityBytes,
        // As lvs: a COW holding only its header and metadata is 0 % full.
        dataPercent: allocatedBytes === metadataBytes ? 0 : fillPercent(allocatedBytes, cowCapacityBytes),
        warnAtPercent: record.warnAtPercent === undefined ? (record.cowSizeBytes === null ? null : DEFAULT_WARN_AT_PERCENT) : record.warnAtPercent,
        autoextend: record.autoextend ?? null,
        originPercent: fillPercent(Math.max(0, allocatedBytes - metadataBytes) / chunkSizeBytes, originChunks),
        state: broken !== undefined ? 'broken' : (snap?.state ?? 'invalid'),
        reason: broken ?? snap?.invalidationReason ?? null,
      })
    }
    const running = this.runningMerge
    const progress = running?.progress()
    const pending = this.manifest.merge
    // A pending merge nobody resumed yet: what is left of it.
    const merge = running && progress
      ? { snapshot: running.snapshot.snapshotName, doneChunks: progress.doneChunks, totalChunks: progress.totalChunks }
      : pending
        ? { snapshot: pending.snapshot, doneChunks: 0, totalChunks: this.snapshotsByName.get(pending.snapshot)?.table.size ?? 0 }
        : null
    return {
      name: this.name,
      path: this.dir,
      sizeBytes: this.manifest.sizeBytes,
      originPath: originPathOf(this.dir, this.manifest),
      originExternal: isExternalOrigin(this.manifest),
      snapshots,
      merge,
    }
  }

  /** The kernel's dmsetup status line for `VOL` or `VOL@SNAP`. */
  statusLine(snapshot: string | null): string {
    const sectors = Math.floor(this.manifest.sizeBytes / SECTOR_BYTES)
    if (!snapshot) {
      const pending = this.manifest.merge?.snapshot
      const merging = this.runningMerge?.snapshot ?? (pending === undefined ? undefined : this.snapshotsByName.get(pending))
      if (merging) return `0 ${sectors} snapshot-merge ${merging.statusText()}`
      return `0 ${sectors} snapshot-origin`
    }
    // No kernel word for a COW that never loaded (dm refuses the table): one that says so.
    if (this.brokenByName.has(snapshot)) return `0 ${sectors} snapshot Broken`
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
      // An extension in flight ends, and is recorded, before its COW closes.
      await this.settled()
      for (const name of [...this.fillWatches.keys()]) this.unwatchFill(name)
      await this.origin.close()
    } catch (err) {
      if (!isSnapError(err, 'SNAP_CLOSED')) throw err
    } finally {
      await this.originLock?.release()
      await this.lock.release()
    }
  }
}

function checkVolumeSize(sizeBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % SECTOR_BYTES !== 0) {
    throw badArgument(`volume size ${sizeBytes} must be a positive multiple of 512 bytes`)
  }
}

/**
 * Creates volume `dir` over origin `path` used in place: nothing is copied, the manifest records
 * the path. Refused for what must not become an origin (a volume's own files, a COW, a mounted
 * or held block device, an origin another volume uses); the checks and the claim run under the
 * origin's flock, so two creates over one origin cannot both pass them.
 */
async function createInPlace(dir: string, path: string): Promise<void> {
  const image = await statImage(path, 'origin')
  if (image.sizeBytes <= 0 || image.sizeBytes % SECTOR_BYTES !== 0) {
    throw badArgument(`origin ${path} is ${image.sizeBytes} bytes: a volume's size must be a positive multiple of 512 bytes`)
  }
  const lock = await OriginLock.acquire(path, image.identity, dir)
  try {
    const dev = await openExternalOrigin(path, image, { readOnly: true })
    try {
      await refuseVolumePart(path, image, dev)
    } finally {
      await dev.close()
    }
    await refuseAliasInUse(path, image)
    await claimOrigin(image.identity, path, dir)
    try {
      await mkdir(dir, { recursive: false })
      try {
        await mkdir(join(dir, SNAPSHOT_DIR))
        const manifest = { version: MANIFEST_VERSION, sizeBytes: image.sizeBytes, originFile: path, originExternal: true as const, snapshots: [], merge: null }
        await writeManifest(dir, manifest)
      } catch (err) {
        // Only what this create made: the origin is not in it.
        await rm(dir, { recursive: true, force: true })
        throw err
      }
    } catch (err) {
      await releaseOrigin(image.identity, dir)
      throw err
    }
  } finally {
    await lock.release()
  }
}

/**
 * Creates volume `dir` over origin `address`, a device URI (an NBD export) used in place: as
 * createInPlace, with the URI's identity (its server and export) standing for the storage.
 */
async function createOnUri(dir: string, address: string): Promise<void> {
  const identity = deviceUriIdentity(address)
  const lock = await OriginLock.acquireUri(address, identity, dir)
  try {
    const dev = await openDevice(address, { readOnly: true })
    let sizeBytes: number
    try {
      sizeBytes = dev.sizeBytes
      if (sizeBytes <= 0 || sizeBytes % SECTOR_BYTES !== 0) {
        throw badArgument(`origin ${address} is ${sizeBytes} bytes: a volume's size must be a positive multiple of 512 bytes`)
      }
      if (await holdsCowHeader(dev)) throw badArgument(`origin ${address} holds a snapshot COW (its header says SnAp): a COW is not an origin`)
    } finally {
      await dev.close()
    }
    await claimOrigin(identity, address, dir)
    await writeInPlaceVolume(dir, address, sizeBytes).catch(async (err: unknown) => {
      await releaseOrigin(identity, dir)
      throw err
    })
  } finally {
    await lock.release()
  }
}

/** The directory and manifest of a new volume over an origin used in place. */
async function writeInPlaceVolume(dir: string, address: string, sizeBytes: number): Promise<void> {
  await mkdir(dir, { recursive: false })
  try {
    await mkdir(join(dir, SNAPSHOT_DIR))
    await writeManifest(dir, { version: MANIFEST_VERSION, sizeBytes, originFile: address, originExternal: true, snapshots: [], merge: null })
  } catch (err) {
    // Only what this create made: the origin is not in it.
    await rm(dir, { recursive: true, force: true })
    throw err
  }
}

/** Opens an external COW: a device URI through openDevice, a path as a file or block device. */
async function openExternalCow(address: string, options: FileDeviceOptions): Promise<BlockDevice> {
  return isDeviceUri(address) ? openDevice(address) : FileDevice.open(address, options)
}

/**
 * Makes device `address` ready to become a fixed-size COW of `cowSizeBytes` (null: the device's
 * size, in whole chunks): refused when it already holds a COW header or is read-only; its header
 * chunk is then zeroed, as a never-initialised COW's, so the store writes a fresh one. Returns
 * the COW size.
 */
async function prepareCowDevice(address: string, cowSizeBytes: number | null, chunkSizeBytes: number): Promise<number> {
  const dev = await openDevice(address)
  try {
    if (await holdsCowHeader(dev)) {
      throw new SnapError('SNAP_BUSY', `COW device ${address} already holds a snapshot COW header (SnAp), perhaps another snapshot's: wipe its first sector to reuse it`, {
        details: { path: address },
      })
    }
    if (!dev.capabilities.writable) throw new SnapError('SNAP_READ_ONLY', `COW device ${address} is read-only`, { details: { path: address } })
    if (cowSizeBytes !== null && cowSizeBytes > dev.sizeBytes) {
      throw badArgument(`COW size ${cowSizeBytes} is larger than COW device ${address} (${dev.sizeBytes} bytes)`)
    }
    const size = cowSizeBytes ?? dev.sizeBytes - (dev.sizeBytes % chunkSizeBytes)
    await dev.write(new Uint8Array(Math.min(chunkSizeBytes, dev.sizeBytes)), 0)
    await dev.flush()
    return size
  } finally {
    await dev.close()
  }
}

/** The manifest's fill fields for a new snapshot, checked (flag names as `snapshot` takes them). */
function fillOptions(options: SnapshotCreateOptions, fixed: boolean): Pick<SnapshotRecord, 'warnAtPercent' | 'autoextend'> {
  const warnAt = options.warnAtPercent === undefined ? (fixed ? DEFAULT_WARN_AT_PERCENT : null) : options.warnAtPercent
  if (warnAt !== null && !isPercent(warnAt, 1, 99)) throw badArgument(`--warn-at ${String(warnAt)} must be a whole percentage from 1 to 99`)
  const threshold = options.autoextendThresholdPercent
  const by = options.autoextendPercent
  if (threshold === undefined) {
    if (by !== undefined) throw badArgument('--autoextend-percent needs --autoextend-threshold')
    return { warnAtPercent: warnAt, autoextend: null }
  }
  if (!isPercent(threshold, 1, 100)) throw badArgument(`--autoextend-threshold ${String(threshold)} must be a whole percentage from 1 to 100 (100: never)`)
  if (by !== undefined && !isPercent(by, 1, 1e15)) throw badArgument(`--autoextend-percent ${String(by)} must be a whole percentage of at least 1`)
  if (threshold === 100) return { warnAtPercent: warnAt, autoextend: null }
  if (!fixed) throw badArgument('--autoextend-threshold needs --cow-size: a COW without one grows on demand')
  return { warnAtPercent: warnAt, autoextend: { thresholdPercent: threshold, percent: by ?? DEFAULT_AUTOEXTEND_PERCENT } }
}

function isPercent(value: unknown, min: number, max: number): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= min && value <= max
}

/** Free space (for unprivileged use) of the file system holding `path`; 0 when unknown. */
async function freeBytesBeside(path: string): Promise<number> {
  const fs = await statfs(dirname(path)).catch(() => null)
  return fs ? fs.bavail * fs.bsize : 0
}

/**
 * Splits `VOL@SNAP` into its parts; `VOL` alone is the origin. Only the last path component
 * names a device, so directories above it may contain '@'; in that component, one '@' at most
 * (snapshot names never contain one).
 */
export function parseDevice(spec: string): { volume: string; snapshot: string | null } {
  const slash = spec.lastIndexOf('/')
  const at = spec.indexOf('@', slash + 1)
  if (at === -1) return { volume: spec, snapshot: null }
  const volume = spec.slice(0, at)
  const snapshot = spec.slice(at + 1)
  if (!volume || !snapshot || snapshot.includes('@')) throw badArgument(`bad device '${spec}': expected VOL or VOL@SNAP`)
  return { volume, snapshot }
}
