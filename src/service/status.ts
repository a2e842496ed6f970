/**
 * One read-only picture of what `serve` is doing: every volume, its snapshots' fill and state, a
 * merge's progress, write-back bytes held, and the clients of each export. Both the metrics
 * endpoint and the status page are rendered from it, so they never disagree.
 *
 * Reading never changes anything: it asks the volumes (Volume.info, merge progress, counters)
 * and the NBD server (clients per export) through their read-only accessors.
 */
import type { MergeState } from '../merge/merge.js'
import type { Snapshot } from '../snapshot/snapshot.js'
import type { Volume } from '../volume/volume.js'
import type { SnapshotListState } from '../volume/volume.js'

/** What the service reads from besides the volumes: the NBD side. */
export interface ServiceSources {
  readonly volumes: readonly Volume[]
  /** Names of the exports served now (`VOL`, `VOL@SNAP`). */
  exportNames(): readonly string[]
  /** Clients in transmission with export `name`. */
  clientsOf(name: string): number
}

export interface SnapshotStatus {
  readonly name: string
  readonly state: SnapshotListState
  /** Why it is invalid or broken; null otherwise. */
  readonly reason: string | null
  /** 1/0 for metrics: not invalid and not broken. */
  readonly valid: boolean
  readonly chunkSizeBytes: number
  /** The COW file's size now (what it can hold when it has a fixed size). */
  readonly cowBytes: number
  /** COW bytes in use: header, metadata and saved chunks. */
  readonly allocatedBytes: number
  /** True when the COW grows on demand (no fixed size). */
  readonly growable: boolean
  /** Free space of the file system the COW grows into (growable COWs; 0 otherwise). */
  readonly freeBytes: number
  /** What the COW can hold: its size, plus the free space when it grows on demand. */
  readonly capacityBytes: number
  /** allocatedBytes against capacityBytes, as `list` shows it (lvs Data%). */
  readonly dataPercent: number
  /** Chunks copied out of the origin into the COW since the volume was opened. */
  readonly copiedOutChunks: number
  /** Clients reading or writing the snapshot's export. */
  readonly connections: number
}

export interface MergeStatus {
  readonly snapshot: string
  /** A Merge's state, or `pending`: recorded, but nobody resumed it yet. */
  readonly state: MergeState | 'pending'
  readonly doneBytes: number
  readonly totalBytes: number
  readonly remainingBytes: number
  /** Measured merge rate (bytes/s) since the last start, resume or rate change. */
  readonly rateBytesPerSecond: number
  /** The configured rate limit in bytes/s; null: none. */
  readonly rateLimitBytesPerSecond: number | null
  /** null while unknown. */
  readonly etaSeconds: number | null
}

export interface VolumeStatus {
  readonly name: string
  readonly path: string
  readonly sizeBytes: number
  /** Clients of the origin export. */
  readonly connections: number
  /** Origin writes answered but not yet on the device (write-back). */
  readonly heldWriteBackBytes: number
  readonly snapshots: readonly SnapshotStatus[]
  readonly merge: MergeStatus | null
}

export interface ServiceStatus {
  /** ISO time the picture was taken. */
  readonly time: string
  readonly uptimeSeconds: number
  readonly volumes: readonly VolumeStatus[]
  /** Every export served now, with its clients. */
  readonly exports: ReadonlyArray<{ readonly name: string; readonly connections: number }>
}

/** Reads a ServiceStatus from `sources`. */
export async function readStatus(sources: ServiceSources, startedAtMs: number): Promise<ServiceStatus> {
  const volumes: VolumeStatus[] = []
  for (const volume of sources.volumes) volumes.push(await volumeStatus(volume, sources))
  return {
    time: new Date().toISOString(),
    uptimeSeconds: Math.max(0, Math.round((Date.now() - startedAtMs) / 1000)),
    volumes,
    exports: sources.exportNames().map((name) => ({ name, connections: sources.clientsOf(name) })),
  }
}

async function volumeStatus(volume: Volume, sources: ServiceSources): Promise<VolumeStatus> {
  const info = await volume.info()
  const snapshots: SnapshotStatus[] = info.snapshots.map((s) => {
    // info() awaited: a snapshot may have gone meanwhile (merged, removed); read what is left.
    const growable = volume.records.find((r) => r.name === s.name)?.cowSizeBytes === null
    const snap = s.state === 'broken' ? null : openSnapshot(volume, s.name)
    return {
      name: s.name,
      state: s.state,
      reason: s.reason,
      valid: s.state !== 'invalid' && s.state !== 'broken',
      chunkSizeBytes: s.chunkSizeBytes,
      cowBytes: s.cowSizeBytes,
      allocatedBytes: s.allocatedBytes,
      growable,
      freeBytes: growable ? s.cowCapacityBytes - s.cowSizeBytes : 0,
      capacityBytes: s.cowCapacityBytes,
      dataPercent: s.dataPercent,
      copiedOutChunks: snap?.copiedOutChunks ?? 0,
      connections: sources.clientsOf(`${volume.name}@${s.name}`),
    }
  })
  return {
    name: volume.name,
    path: volume.dir,
    sizeBytes: volume.sizeBytes,
    connections: sources.clientsOf(volume.name),
    heldWriteBackBytes: volume.origin.heldBytes,
    snapshots,
    merge: mergeStatus(volume, info.merge, snapshots),
  }
}

function openSnapshot(volume: Volume, name: string): Snapshot | null {
  try {
    return volume.snapshot(name)
  } catch {
    return null
  }
}

function mergeStatus(
  volume: Volume,
  recorded: { snapshot: string; doneChunks: number; totalChunks: number } | null,
  snapshots: readonly SnapshotStatus[],
): MergeStatus | null {
  const running = volume.merge
  if (running !== null) {
    const p = running.progress()
    return {
      snapshot: running.snapshot.snapshotName,
      state: running.state,
      doneBytes: p.doneBytes,
      totalBytes: p.totalBytes,
      remainingBytes: p.totalBytes - p.doneBytes,
      rateBytesPerSecond: running.state === 'running' ? p.rateBytesPerSecond : 0,
      rateLimitBytesPerSecond: running.rateBytesPerSecond > 0 ? running.rateBytesPerSecond : null,
      etaSeconds: running.state === 'running' || running.state === 'complete' ? p.etaSeconds : null,
    }
  }
  if (recorded === null) return null
  const chunkBytes = snapshots.find((s) => s.name === recorded.snapshot)?.chunkSizeBytes ?? 0
  const totalBytes = recorded.totalChunks * chunkBytes
  const doneBytes = recorded.doneChunks * chunkBytes
  return {
    snapshot: recorded.snapshot,
    state: 'pending',
    doneBytes,
    totalBytes,
    remainingBytes: totalBytes - doneBytes,
    rateBytesPerSecond: 0,
    rateLimitBytesPerSecond: volume.pendingMergeRate,
    etaSeconds: null,
  }
}
