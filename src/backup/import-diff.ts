/**
 * import-diff: brings a volume's origin to snapshot B of a diff stream and records B there.
 *
 * Verify, then apply: the stream is first copied into a private staging file in the target
 * volume's directory while every record, the trailer and the end of input are checked
 * (stageDiffStream), so a corrupt, truncated or reordered stream, from a file or from stdin,
 * is refused before anything of the target is touched. Only then does applyDiffStream check the
 * target (size, snapshot A, no snapshot B yet) and write the origin from the staged copy.
 *
 * Applying writes through the origin, so every snapshot of the target keeps its view (their
 * COWs save what is overwritten). Data equal to what the origin holds is not rewritten and
 * zero ranges are zeroed only where the origin is not zero already, so a sparse target stays
 * sparse and its snapshots copy nothing they need not.
 *
 * A crash (or an I/O error) part way through applying leaves the origin between A and B, with
 * no snapshot B. Snapshot A still holds A's view (its COW saved every overwritten chunk), so
 * `merge VOL@A` rolls the origin back; or the same import run again with --force completes it
 * (every extent where A and B differ is rewritten; nothing else was touched).
 */
import { open, unlink } from 'node:fs/promises'
import { randomBytes } from 'node:crypto'
import { basename, dirname, join } from 'node:path'
import { SnapError, asSnapError } from '../errors.js'
import type { Volume } from '../volume/volume.js'
import { type StreamHeader, type StreamTotals, readDiffStream } from './diff-stream.js'
import type { BackupProgress } from './export-diff.js'

export const STAGE_PREFIX = '.import-diff-'
const STAGE_SUFFIX = '.stage'
/** Piece of a zero record checked (and zeroed where needed) at a time. */
const ZERO_PIECE_BYTES = 1024 * 1024

export interface ImportOptions {
  /** Apply an incremental stream although the target does not hold an unchanged snapshot A. */
  readonly force?: boolean
}

export interface ImportSummary {
  readonly from: string | null
  readonly to: string
  readonly sizeBytes: number
  /** Bytes the stream covers, data and zero records together. */
  readonly changedBytes: number
  readonly dataBytes: number
  /** Bytes the origin actually had written or zeroed (equal data is skipped). */
  readonly writtenBytes: number
  readonly streamBytes: number
}

export interface StagedStream {
  readonly path: string
  readonly header: StreamHeader
  readonly totals: StreamTotals
}

/** A fresh staging file name in volume directory `dir`. */
export function stagePath(dir: string): string {
  return join(dir, `${STAGE_PREFIX}${process.pid}-${randomBytes(4).toString('hex')}${STAGE_SUFFIX}`)
}

/** Whether `path` names a staging file directly inside volume directory `dir` (the server applies no other file). */
export function isStagePath(dir: string, path: string): boolean {
  const name = basename(path)
  return dirname(path) === dir && name.startsWith(STAGE_PREFIX) && name.endsWith(STAGE_SUFFIX) && !name.includes('/')
}

/**
 * Copies `source` into a new private file at `path` while checking it completely; resolves once
 * the whole stream is known good. On any failure the file is removed.
 */
export async function stageDiffStream(
  source: AsyncIterable<Uint8Array>,
  path: string,
  onProgress: (p: BackupProgress) => void = () => {},
): Promise<StagedStream> {
  let handle
  try {
    handle = await open(path, 'wx', 0o600)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new SnapError('SNAP_NOT_FOUND', `volume ${dirname(path)} does not exist`)
    throw asSnapError(err, `cannot stage the stream in ${dirname(path)}`)
  }
  let kept = false
  try {
    let staged = 0
    const file = handle
    async function* copying(): AsyncIterable<Uint8Array> {
      for await (const piece of source) {
        for (let done = 0; done < piece.length; ) done += (await file.write(piece, done, piece.length - done, null)).bytesWritten
        staged += piece.length
        onProgress({ phase: 'stage', doneBytes: staged, totalBytes: null })
        yield piece
      }
    }
    let header: StreamHeader | null = null
    const totals = await readDiffStream(
      copying(),
      (h) => {
        header = h
      },
      () => {},
    )
    await handle.sync()
    kept = true
    return { path, header: header as unknown as StreamHeader, totals }
  } finally {
    await handle.close().catch(() => {})
    if (!kept) await unlink(path).catch(() => {})
  }
}

/** Throws when `volume` cannot take the stream described by `header` (nothing is changed). */
export function checkTarget(volume: Volume, header: StreamHeader, options: ImportOptions): void {
  const name = volume.name
  if (header.sizeBytes !== volume.sizeBytes) {
    throw new SnapError('SNAP_BAD_ARGUMENT', `the stream is for a volume of ${header.sizeBytes} bytes; ${name} has ${volume.sizeBytes}`)
  }
  if (volume.records.some((r) => r.name === header.to)) {
    throw new SnapError('SNAP_EXISTS', `${name} already holds a snapshot named '${header.to}' (the stream's target)`)
  }
  if (volume.pendingMerge !== null) throw new SnapError('SNAP_BUSY', `${name} is merging ${volume.pendingMerge}; import when the merge is done`)
  const from = header.from
  if (from === null || options.force) return
  if (!volume.records.some((r) => r.name === from)) {
    throw new SnapError('SNAP_NOT_FOUND', `${name} holds no snapshot '${from}', which this incremental stream starts from (--force applies it anyway)`)
  }
  const snap = volume.snapshot(from)
  if (!snap.valid) throw new SnapError('SNAP_INVALID', `snapshot ${name}@${from} is invalid, so ${name} cannot be shown unchanged since it (--force applies the stream anyway)`)
  // An origin write copies the chunk into every snapshot first, so an empty table means nothing
  // was written on the origin (nor on the snapshot) since it was taken: its view equals the origin.
  const changed = snap.exceptionRanges()
  if (changed.length > 0) {
    let chunks = 0
    for (const r of changed) chunks += r.endChunk - r.startChunk
    throw new SnapError(
      'SNAP_BAD_ARGUMENT',
      `${name} has changed since snapshot ${from} (${chunks} chunk${chunks === 1 ? '' : 's'} written since): the stream from ${from} does not apply (--force applies it anyway)`,
    )
  }
}

/** Zeroes what is not zero yet in [offset, offset + length) of the origin, granule by granule. */
async function zeroRange(volume: Volume, offset: number, length: number, granuleBytes: number): Promise<number> {
  const origin = volume.origin
  const zeros = new Uint8Array(granuleBytes)
  let written = 0
  for (let piece = offset; piece < offset + length; piece += ZERO_PIECE_BYTES) {
    const n = Math.min(ZERO_PIECE_BYTES, offset + length - piece)
    const current = await origin.read(piece, n)
    let runStart = -1
    const zeroRun = async (end: number): Promise<void> => {
      if (runStart < 0) return
      await origin.discard(piece + runStart, end - runStart)
      written += end - runStart
      runStart = -1
    }
    for (let pos = 0; pos < n; pos += granuleBytes) {
      const end = Math.min(n, pos + granuleBytes)
      const dirty = Buffer.compare(current.subarray(pos, end), zeros.subarray(0, end - pos)) !== 0
      if (dirty && runStart < 0) runStart = pos
      else if (!dirty) await zeroRun(pos)
    }
    await zeroRun(n)
  }
  return written
}

/**
 * Applies a staged (already verified) stream to `volume`'s origin and creates snapshot B. The
 * stream is checked again as it is read, which costs little and guards the staged copy.
 */
export async function applyDiffStream(
  volume: Volume,
  staged: { readonly path: string; readonly totals?: StreamTotals },
  options: ImportOptions = {},
  onProgress: (p: BackupProgress) => void = () => {},
): Promise<ImportSummary> {
  const handle = await open(staged.path, 'r')
  let header: StreamHeader | null = null
  let writtenBytes = 0
  let doneBytes = 0
  const totalBytes = staged.totals ? staged.totals.dataBytes + staged.totals.zeroBytes : null
  try {
    const origin = volume.origin
    const totals = await readDiffStream(
      fileChunks(handle),
      (h) => {
        checkTarget(volume, h, options)
        header = h
        onProgress({ phase: 'apply', doneBytes, totalBytes })
      },
      async (record) => {
        const h = header as unknown as StreamHeader
        if (record.type === 'data') {
          const current = await origin.read(record.offset, record.data.length)
          if (Buffer.compare(current, record.data) !== 0) {
            await origin.write(record.data, record.offset)
            writtenBytes += record.data.length
          }
          doneBytes += record.data.length
        } else {
          writtenBytes += await zeroRange(volume, record.offset, record.length, h.granularityBytes)
          doneBytes += record.length
        }
        onProgress({ phase: 'apply', doneBytes, totalBytes })
      },
    )
    const h = header as unknown as StreamHeader
    await origin.flush()
    await volume.createSnapshot(h.to, { chunkSizeBytes: h.chunkSizeBytes })
    return {
      from: h.from,
      to: h.to,
      sizeBytes: h.sizeBytes,
      changedBytes: totals.dataBytes + totals.zeroBytes,
      dataBytes: totals.dataBytes,
      writtenBytes,
      streamBytes: totals.streamBytes,
    }
  } finally {
    await handle.close()
  }
}

/** The file's bytes in order, in 1 MiB reads. */
async function* fileChunks(handle: Awaited<ReturnType<typeof open>>): AsyncIterable<Uint8Array> {
  for (let pos = 0; ; ) {
    const buf = Buffer.allocUnsafe(1024 * 1024)
    const { bytesRead } = await handle.read(buf, 0, buf.length, pos)
    if (bytesRead === 0) return
    pos += bytesRead
    yield buf.subarray(0, bytesRead)
  }
}
