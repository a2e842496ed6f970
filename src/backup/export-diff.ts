/**
 * export-diff: writes snapshot B of a volume as a diff stream (diff-stream.ts), either full
 * (every byte of B, zeros as zero records) or incremental from snapshot A (only the extents
 * where B differs from A). Works over any DiffSource: an open volume, or a served one through
 * its control socket, so a live volume is exported from its point-in-time snapshot while
 * clients keep writing the origin.
 */
import { SnapError } from '../errors.js'
import type { VolumeInfo } from '../volume/volume.js'
import type { DiffExtent, DiffResult } from './diff.js'
import { DiffStreamWriter } from './diff-stream.js'

/** What export-diff needs of a volume (VolumeOps provides it, offline and live). */
export interface DiffSource {
  list(): Promise<VolumeInfo>
  diff(from: string | null, to: string | null): Promise<DiffResult>
  read(snapshot: string | null, offset: number, length: number): Promise<Uint8Array>
}

export interface BackupProgress {
  readonly phase: 'export' | 'stage' | 'apply'
  readonly doneBytes: number
  /** Null while it is not known (a stream still arriving on stdin). */
  readonly totalBytes: number | null
}

export interface ExportSummary {
  readonly from: string | null
  readonly to: string
  readonly sizeBytes: number
  /** Bytes the stream covers: B's changed extents, or the whole volume for a full stream. */
  readonly changedBytes: number
  /** Bytes carried as data (the rest of changedBytes travels as zero records). */
  readonly dataBytes: number
  readonly streamBytes: number
}

/** Bytes of B read at a time (a multiple of every chunk size, so granule aligned). */
const READ_PIECE_BYTES = 4 * 1024 * 1024

export async function exportDiff(
  source: DiffSource,
  to: string,
  from: string | null,
  emit: (bytes: Uint8Array) => Promise<void>,
  onProgress: (p: BackupProgress) => void = () => {},
): Promise<ExportSummary> {
  const info = await source.list()
  const record = info.snapshots.find((s) => s.name === to)
  if (!record) throw new SnapError('SNAP_NOT_FOUND', `no snapshot '${to}' in volume ${info.name}`)
  const sizeBytes = info.sizeBytes
  let extents: DiffExtent[]
  let granularityBytes: number
  if (from === null) {
    extents = [{ offset: 0, length: sizeBytes }]
    granularityBytes = record.chunkSizeBytes
  } else {
    if (from === to) throw new SnapError('SNAP_BAD_ARGUMENT', `--from names the exported snapshot ${to} itself`)
    const diff = await source.diff(from, to)
    extents = diff.extents
    granularityBytes = diff.granularityBytes
  }
  let changedBytes = 0
  for (const e of extents) changedBytes += e.length
  const writer = new DiffStreamWriter(emit)
  await writer.header({ sizeBytes, from, to, granularityBytes, chunkSizeBytes: record.chunkSizeBytes })
  const zeros = new Uint8Array(granularityBytes)
  let dataBytes = 0
  let doneBytes = 0
  // A zero run not yet written: runs that touch across pieces and extents become one record.
  let zeroStart = -1
  let zeroEnd = -1
  const flushZeros = async (): Promise<void> => {
    if (zeroStart >= 0) await writer.zero(zeroStart, zeroEnd - zeroStart)
    zeroStart = -1
  }
  const pieces: Array<[number, number]> = []
  for (const e of extents) {
    for (let pos = e.offset; pos < e.offset + e.length; pos += READ_PIECE_BYTES) {
      pieces.push([pos, Math.min(e.offset + e.length, pos + READ_PIECE_BYTES)])
    }
  }
  onProgress({ phase: 'export', doneBytes, totalBytes: changedBytes })
  // One piece read ahead, so reading (a round trip when live) overlaps writing the stream.
  const readPiece = (k: number) => {
    const [start, end] = pieces[k]!
    const p = source.read(to, start, end - start)
    p.catch(() => {})
    return p
  }
  let ahead = pieces.length > 0 ? readPiece(0) : null
  for (let k = 0; k < pieces.length; k++) {
    const data = await (ahead as Promise<Uint8Array>)
    ahead = k + 1 < pieces.length ? readPiece(k + 1) : null
    const start = pieces[k]![0]
    // Runs of all-zero granules become zero records, runs of the others data records.
    const isZero = (pos: number): boolean => {
      const end = Math.min(data.length, pos + granularityBytes)
      return Buffer.compare(data.subarray(pos, end), zeros.subarray(0, end - pos)) === 0
    }
    for (let pos = 0; pos < data.length; ) {
      const zero = isZero(pos)
      let end = Math.min(data.length, pos + granularityBytes)
      while (end < data.length && isZero(end) === zero) end = Math.min(data.length, end + granularityBytes)
      if (!zero) {
        await flushZeros()
        await writer.data(start + pos, data.subarray(pos, end))
        dataBytes += end - pos
      } else if (zeroStart >= 0 && zeroEnd === start + pos) {
        zeroEnd = start + end
      } else {
        await flushZeros()
        zeroStart = start + pos
        zeroEnd = start + end
      }
      pos = end
    }
    doneBytes += data.length
    onProgress({ phase: 'export', doneBytes, totalBytes: changedBytes })
  }
  await flushZeros()
  await writer.trailer()
  return { from, to, sizeBytes, changedBytes, dataBytes, streamBytes: writer.bytesWritten }
}
