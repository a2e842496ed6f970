/**
 * `blocksnap dump`: what a persistent COW file says, read without attaching it (like thin_dump):
 * header, geometry, and the exception table as runs (origin chunk -> COW chunk, in table order).
 * A damaged file is read as far as it decodes; `stop` says where and why reading ended, for a
 * clean table too (the terminator entry, or the last area full). Never writes.
 */
import { resolve } from 'node:path'
import { openDevice } from '../device/open-device.js'
import { SnapError, isSnapError } from '../errors.js'
import { decodeArea } from '../format/area.js'
import { decodeHeader } from '../format/header.js'
import { ENTRY_BYTES, FORMAT_VERSION, areaChunk, layoutFor } from '../format/layout.js'
import { MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, SECTOR_BYTES, isPowerOfTwo } from '../units.js'
import { cowPathOf, readManifest } from './manifest.js'

export interface DumpRun {
  readonly originChunk: number
  readonly cowChunk: number
  readonly chunks: number
}

export interface CowDump {
  readonly version: 1
  readonly cowPath: string
  readonly cowSizeBytes: number
  readonly header: { readonly magic: string; readonly valid: boolean; readonly version: number; readonly chunkSizeSectors: number } | null
  readonly geometry: {
    readonly chunkSizeBytes: number
    readonly exceptionsPerArea: number
    readonly cowChunks: number
    /** Metadata areas read (including a partly filled last one). */
    readonly areasRead: number
  } | null
  readonly exceptions: number
  readonly runs: DumpRun[]
  /** True when the table was read to its end with nothing undecodable. */
  readonly complete: boolean
  /** Where reading ended and why; `area`/`entry` are null when it ended before the table. */
  readonly stop: { readonly area: number | null; readonly entry: number | null; readonly offsetBytes: number; readonly reason: string }
}

function pushEntry(runs: DumpRun[], oldChunk: number, newChunk: number): void {
  const last = runs[runs.length - 1]
  if (last && last.originChunk + last.chunks === oldChunk && last.cowChunk + last.chunks === newChunk) {
    runs[runs.length - 1] = { ...last, chunks: last.chunks + 1 }
  } else runs.push({ originChunk: oldChunk, cowChunk: newChunk, chunks: 1 })
}

export async function dumpCow(path: string): Promise<CowDump> {
  const dev = await openDevice(path, { readOnly: true })
  const runs: DumpRun[] = []
  let exceptions = 0
  const base = { version: 1 as const, cowPath: path, cowSizeBytes: dev.sizeBytes }
  const early = (reason: string, header: CowDump['header'] = null): CowDump => ({
    ...base, header, geometry: null, exceptions: 0, runs, complete: false, stop: { area: null, entry: null, offsetBytes: 0, reason },
  })
  try {
    if (dev.sizeBytes < 512) return early(`the file is too small to hold a header (${dev.sizeBytes} bytes)`)
    let decoded
    try {
      decoded = decodeHeader(await dev.read(0, 512))
    } catch (err) {
      return early(isSnapError(err) ? err.message : String(err))
    }
    if (decoded.kind === 'new') return early('header is empty: the COW was never initialised')
    const header = { magic: 'SnAp', valid: decoded.valid, version: decoded.version, chunkSizeSectors: decoded.chunkSizeSectors }
    if (decoded.version !== FORMAT_VERSION) return early(`unsupported format version ${decoded.version}`, header)
    const chunkBytes = decoded.chunkSizeSectors * SECTOR_BYTES
    if (!isPowerOfTwo(chunkBytes) || chunkBytes < MIN_CHUNK_BYTES || chunkBytes > MAX_CHUNK_BYTES) {
      return early(`unsupported chunk size ${decoded.chunkSizeSectors} sectors`, header)
    }
    const layout = layoutFor(chunkBytes)
    const cowChunks = Math.floor(dev.sizeBytes / chunkBytes)
    let stop: CowDump['stop']
    let complete = false
    let area = 0
    for (; ; area++) {
      const at = areaChunk(layout, area)
      const offsetBytes = at * chunkBytes
      if (at >= cowChunks) {
        stop = { area, entry: null, offsetBytes, reason: `metadata area ${area} (chunk ${at}) is missing: the file ends at ${dev.sizeBytes} bytes` }
        break
      }
      const bytes = await dev.read(offsetBytes, chunkBytes)
      let decodedArea
      try {
        decodedArea = decodeArea(bytes)
      } catch (err) {
        // Keep the entries before the bad one: decode them one by one up to it.
        const badAt = isSnapError(err) && typeof err.details?.offset === 'number' ? err.details.offset : 0
        const good = Math.floor(badAt / ENTRY_BYTES)
        const partial = decodeArea(bytes.subarray(0, good * ENTRY_BYTES))
        for (const e of partial.entries) pushEntry(runs, e.oldChunk, e.newChunk)
        exceptions += partial.entries.length
        stop = { area, entry: good, offsetBytes: offsetBytes + good * ENTRY_BYTES, reason: `metadata area ${area} entry ${good}: ${(err as Error).message}` }
        area++
        break
      }
      for (const e of decodedArea.entries) pushEntry(runs, e.oldChunk, e.newChunk)
      exceptions += decodedArea.entries.length
      if (!decodedArea.full) {
        const entry = decodedArea.entries.length
        stop = { area, entry, offsetBytes: offsetBytes + entry * ENTRY_BYTES, reason: 'end of the exception table' }
        complete = true
        area++
        break
      }
    }
    return {
      ...base,
      header,
      geometry: { chunkSizeBytes: chunkBytes, exceptionsPerArea: layout.exceptionsPerArea, cowChunks, areasRead: area },
      exceptions,
      runs,
      complete,
      stop,
    }
  } finally {
    await dev.close()
  }
}

/** The COW file of `snapshot` in the volume at `dirPath`, from the manifest alone (no lock). */
export async function snapshotCowPath(dirPath: string, snapshot: string): Promise<string> {
  const dir = resolve(dirPath)
  const manifest = await readManifest(dir)
  const record = manifest.snapshots.find((r) => r.name === snapshot)
  if (!record) throw new SnapError('SNAP_NOT_FOUND', `no snapshot '${snapshot}' in volume ${dir}`)
  if (record.store !== 'persistent') throw new SnapError('SNAP_BAD_ARGUMENT', `snapshot ${snapshot} is transient: its exceptions live only in the server's memory`)
  return cowPathOf(dir, record)
}
