/**
 * The operations the CLI performs on a volume, written once over an open Volume. Offline, the
 * CLI opens the volume and calls them directly; while `blocksnap serve` owns the volume, the
 * control server calls the very same functions on the server's Volume.
 */
import { SnapError, badArgument } from '../errors.js'
import { SECTOR_BYTES } from '../units.js'
import type { SnapshotCreateOptions, Volume, VolumeInfo } from '../volume/volume.js'
import { checkCow } from '../volume/check.js'
import { type AllocationExtent, allocationExtents } from '../volume/block-maps.js'
import { type DiffResult, diffVolume } from '../backup/diff.js'
import { type ImportOptions, type ImportSummary, applyDiffStream, isStagePath } from '../backup/import-diff.js'

/** Largest piece moved in one control request (keeps JSON messages bounded). */
export const IO_PIECE_BYTES = 4 * 1024 * 1024

export interface RemoveOptions {
  /** Remove even when NBD clients have it open, or when it is broken. */
  readonly force?: boolean
}

/** Who else has a device open: the NBD clients of a served volume (offline, nobody). */
export interface DeviceUsers {
  /** Clients connected to export `exportName` (`VOL` or `VOL@SNAP`). */
  clientsOf(exportName: string): number
}

export const NO_USERS: DeviceUsers = { clientsOf: () => 0 }

/**
 * Refuses to take snapshot `name` away (remove, merge) from NBD clients that have it open, as
 * LVM refuses to remove an open LV; `force` takes it anyway (its clients then get ESHUTDOWN).
 */
export function refuseIfOpen(volume: Volume, name: string, users: DeviceUsers, force: boolean): void {
  if (force) return
  const exportName = `${volume.name}@${name}`
  const clients = users.clientsOf(exportName)
  if (clients === 0) return
  throw new SnapError(
    'SNAP_BUSY',
    `snapshot ${exportName} is open by ${clients} NBD client${clients === 1 ? '' : 's'} (export ${exportName}); use --force`,
  )
}

export interface VolumeOps {
  list(): Promise<VolumeInfo>
  status(snapshot: string | null): Promise<string>
  snapshot(name: string, options: SnapshotCreateOptions): Promise<void>
  remove(name: string, options?: RemoveOptions): Promise<void>
  importCow(name: string, cowFile: string, inPlace: boolean): Promise<void>
  check(name: string | null): Promise<{ clean: boolean; problems: string[] }>
  size(snapshot: string | null): Promise<number>
  read(snapshot: string | null, offset: number, length: number): Promise<Uint8Array>
  write(snapshot: string | null, offset: number, data: Uint8Array): Promise<void>
  flush(snapshot: string | null): Promise<void>
  /** Where VOL or VOL@SNAP holds data, over the whole device. */
  map(snapshot: string | null): Promise<AllocationExtent[]>
  /** Changed extents between two views (null: the origin). */
  diff(from: string | null, to: string | null): Promise<DiffResult>
  /**
   * Applies a diff stream already staged (and verified) in a staging file of the volume
   * directory: the file is read where it lies, not sent through the socket.
   */
  importDiff(stagedPath: string, options: ImportOptions): Promise<ImportSummary>
}

export function localOps(volume: Volume, users: DeviceUsers = NO_USERS): VolumeOps {
  const checkRange = (offset: number, length: number) => {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw badArgument(`bad range offset=${offset} length=${length}`)
    }
    if (offset + length > volume.sizeBytes) {
      throw new SnapError('SNAP_OUT_OF_RANGE', `range ${offset}+${length} is beyond the end of the volume (${volume.sizeBytes} bytes)`)
    }
  }
  return {
    async list() {
      return volume.info()
    },
    async status(snapshot) {
      return volume.statusLine(snapshot)
    },
    async snapshot(name, options) {
      await volume.createSnapshot(name, options)
    },
    async remove(name, options = {}) {
      refuseIfOpen(volume, name, users, options.force === true)
      await volume.removeSnapshot(name, options.force ? { force: true } : {})
    },
    async importCow(name, cowFile, inPlace) {
      await volume.importSnapshot(name, cowFile, { inPlace })
    },
    async check(name) {
      const names = name ? [name] : volume.records.map((r) => r.name)
      const problems: string[] = []
      for (const n of names) {
        const record = volume.record(n)
        const broken = volume.broken(n)
        if (record.store !== 'persistent') continue
        const found = await checkCow(volume.cowPath(record), { originSizeBytes: volume.sizeBytes })
        // A COW that failed to attach is a problem even when the file alone looks sound.
        if (broken !== null && found.length === 0) found.push(`broken: ${broken}`)
        for (const p of found) problems.push(`${n}: ${p}`)
      }
      return { clean: problems.length === 0, problems }
    },
    async size() {
      return volume.sizeBytes
    },
    async read(snapshot, offset, length) {
      checkRange(offset, length)
      return volume.device(snapshot).read(offset, length)
    },
    async write(snapshot, offset, data) {
      checkRange(offset, data.length)
      const dev = volume.device(snapshot)
      await dev.write(data, offset)
    },
    async flush(snapshot) {
      await volume.device(snapshot).flush()
    },
    async map(snapshot) {
      return allocationExtents(volume, snapshot, 0, volume.sizeBytes)
    },
    async diff(from, to) {
      return diffVolume(volume, from, to)
    },
    async importDiff(stagedPath, options) {
      if (!isStagePath(volume.dir, stagedPath)) throw badArgument(`${stagedPath} is not a staged diff stream of volume ${volume.name}`)
      return applyDiffStream(volume, { path: stagedPath }, options)
    },
  }
}

export { SECTOR_BYTES }
