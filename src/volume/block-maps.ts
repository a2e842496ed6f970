/**
 * Maps of a volume's devices for backup tools: where they hold data (NBD base:allocation and
 * `blocksnap map`) and which chunks the origin changed since a snapshot (qemu:dirty-bitmap).
 *
 * Allocation. The origin holds data where its file does (FIEMAP, see device/file-allocation.ts),
 * where answered writes are still on their way to the file (write-back), and, during a merge,
 * where the merging snapshot still holds chunks the origin reads from its COW. A snapshot holds
 * data where it has exceptions and, elsewhere, where the origin does. Everything else reads as
 * zeros. Errors only ever widen "data".
 *
 * Dirty chunks of snapshot S: S's exceptions, complete or being copied. An origin write saves the
 * old chunk into S before it lands, so every chunk the origin changed since S is among them. A
 * write to S itself also makes an exception, and the COW format does not record which kind a
 * chunk is (and once a chunk has one, later origin writes to it leave no trace), so those chunks
 * are reported dirty too: a superset, which costs a backup tool a few extra chunks and never a
 * missed one.
 */
import { FileDevice } from '../device/file-device.js'
import { unionRanges } from '../device/range-list.js'
import { SnapError } from '../errors.js'
import { MergeView } from '../merge/merge-view.js'
import type { ChunkRun } from '../snapshot/exception-runs.js'
import type { Snapshot } from '../snapshot/snapshot.js'
import type { Volume } from './volume.js'

export interface AllocationExtent {
  readonly offset: number
  readonly length: number
  /** false: reads as zeros, nothing stored (a hole). */
  readonly data: boolean
}

export interface DirtyExtent {
  readonly offset: number
  readonly length: number
  readonly dirty: boolean
}

const BLOCK_BYTES = 4096

type Ranges = ReadonlyArray<readonly [number, number]>

function runBytes(runs: readonly ChunkRun[], chunkBytes: number): Array<[number, number]> {
  return runs.map((r) => [r.oldChunk * chunkBytes, (r.oldChunk + r.chunks) * chunkBytes])
}

/** Origin chunks of `snap` overlapping [start, end). */
function chunkWindow(snap: Snapshot, start: number, end: number): [number, number] {
  return [Math.floor(start / snap.chunkBytes), Math.ceil(end / snap.chunkBytes)]
}

/** The extents of [start, end): `inside` for bytes in `ranges` (sorted, merged), the rest not. */
function partition(ranges: Ranges, start: number, end: number): Array<{ offset: number; length: number; inside: boolean }> {
  const out: Array<{ offset: number; length: number; inside: boolean }> = []
  let pos = start
  for (const [s, e] of ranges) {
    if (s > pos) out.push({ offset: pos, length: s - pos, inside: false })
    out.push({ offset: s, length: e - s, inside: true })
    pos = e
  }
  if (pos < end) out.push({ offset: pos, length: end - pos, inside: false })
  return out
}

async function originDataRanges(volume: Volume, start: number, end: number): Promise<Array<[number, number]>> {
  const origin = volume.origin
  const device = origin.device
  const lists: Ranges[] = [
    device instanceof FileDevice ? await device.dataRanges(start, end - start) : [[start, end]],
    // Read after the file map: a held write lands (and is counted there) before it leaves this
    // list. Widened to 4 KiB blocks as the file map counts writes, so a map's shape does not
    // depend on whether a write has landed yet.
    origin.unlandedRanges().map(([s, e]): [number, number] => [Math.floor(s / BLOCK_BYTES) * BLOCK_BYTES, Math.ceil(e / BLOCK_BYTES) * BLOCK_BYTES]),
  ]
  const interceptor = origin.interceptor
  if (interceptor instanceof MergeView) {
    const merging = interceptor.snapshot
    const [first, last] = chunkWindow(merging, start, end)
    lists.push(runBytes(merging.exceptionRunsIn(first, last), merging.chunkBytes))
  }
  return unionRanges(lists, start, end)
}

function checkWindow(volume: Volume, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > volume.sizeBytes) {
    throw new SnapError('SNAP_OUT_OF_RANGE', `range ${offset}+${length} is beyond the end of the volume (${volume.sizeBytes} bytes)`)
  }
}

/** Where `VOL` (snapshot null) or `VOL@snapshot` holds data within [offset, offset + length). */
export async function allocationExtents(volume: Volume, snapshot: string | null, offset: number, length: number): Promise<AllocationExtent[]> {
  checkWindow(volume, offset, length)
  const end = offset + length
  let ranges = await originDataRanges(volume, offset, end)
  if (snapshot) {
    const snap = volume.snapshot(snapshot)
    const [first, last] = chunkWindow(snap, offset, end)
    ranges = unionRanges([ranges, runBytes(snap.exceptionRunsIn(first, last), snap.chunkBytes)], offset, end)
  }
  return partition(ranges, offset, end).map((e) => ({ offset: e.offset, length: e.length, data: e.inside }))
}

/** Whether `snap` tracks origin writes, so its dirty map means something; the reason if not. */
export function dirtyMapRefusal(snap: Snapshot): string | null {
  if (!snap.active) return 'it was removed'
  switch (snap.state) {
    case 'active':
    case 'overflow':
      return null
    case 'invalid':
      return 'it is invalid, so origin writes are no longer tracked'
    default:
      return 'it is being merged into the origin'
  }
}

/** Chunks of the origin written since `snap` was taken (a superset: see the top). */
export function dirtyExtents(volume: Volume, snap: Snapshot, offset: number, length: number): DirtyExtent[] {
  checkWindow(volume, offset, length)
  const refusal = dirtyMapRefusal(snap)
  if (refusal !== null) throw new SnapError('SNAP_INVALID', `no dirty map for snapshot ${snap.snapshotName}: ${refusal}`)
  const end = offset + length
  const chunkBytes = snap.chunkBytes
  const [first, last] = chunkWindow(snap, offset, end)
  const pending = snap.pendingChunksIn(first, last).map((c): [number, number] => [c * chunkBytes, (c + 1) * chunkBytes])
  const ranges = unionRanges([runBytes(snap.exceptionRunsIn(first, last), chunkBytes), pending], offset, end)
  return partition(ranges, offset, end).map((e) => ({ offset: e.offset, length: e.length, dirty: e.inside }))
}
