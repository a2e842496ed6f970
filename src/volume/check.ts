/**
 * Offline verification of a persistent COW (a file, block device or device URI): header, every metadata area, chunk bounds,
 * entries pointing at metadata chunks, and duplicate origin chunks. Returns the problems found
 * (empty when clean); never modifies the file.
 */
import { resolve } from 'node:path'
import type { BlockDevice } from '../device/block-device.js'
import { openDevice } from '../device/open-device.js'
import { SnapError, isSnapError } from '../errors.js'
import { decodeArea } from '../format/area.js'
import { decodeHeader } from '../format/header.js'
import { FORMAT_VERSION, areaChunk, isMetadataChunk, layoutFor } from '../format/layout.js'
import { type Manifest, cowPathOf, isExternal, readManifest } from './manifest.js'
import { acquireOwnership } from './ownership.js'
import { resolveInside } from './volume-files.js'
import { MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, SECTOR_BYTES, isPowerOfTwo } from '../units.js'

/** check lists at most this many problems per COW: a COW for another origin fails every entry. */
export const MAX_PROBLEMS = 100

export interface CheckCowOptions {
  /** Entries must address chunks of an origin this large (unchecked when absent). */
  readonly originSizeBytes?: number
  /**
   * Report a header marked invalid (default true). Import leaves it out: an invalidated snapshot
   * is adopted as it is, like the kernel loads it, while a COW that does not fit is refused.
   */
  readonly reportInvalid?: boolean
}

export async function checkCow(path: string, options: CheckCowOptions = {}): Promise<string[]> {
  let dev: BlockDevice
  try {
    dev = await openDevice(path, { readOnly: true })
  } catch (err) {
    return [`cannot open ${path}: ${(err as Error).message}`]
  }
  const problems: string[] = []
  let more = false
  /** Records a problem; false once the cap is reached and the scan should stop. */
  const report = (problem: string): boolean => {
    if (problems.length < MAX_PROBLEMS) problems.push(problem)
    else more = true
    return !more
  }
  try {
    if (dev.sizeBytes < 512) return [`${path} is too small to hold a header (${dev.sizeBytes} bytes)`]
    let header
    try {
      header = decodeHeader(await dev.read(0, 512))
    } catch (err) {
      return [isSnapError(err) ? err.message : String(err)]
    }
    if (header.kind === 'new') return ['header is empty: the COW was never initialised']
    if (header.version !== FORMAT_VERSION) report(`unsupported format version ${header.version}`)
    const chunkBytes = header.chunkSizeSectors * SECTOR_BYTES
    if (!isPowerOfTwo(chunkBytes) || chunkBytes < MIN_CHUNK_BYTES || chunkBytes > MAX_CHUNK_BYTES) {
      report(`unsupported chunk size ${header.chunkSizeSectors} sectors`)
      return problems
    }
    if (!header.valid && options.reportInvalid !== false) report('snapshot is marked invalid')
    const layout = layoutFor(chunkBytes)
    const cowChunks = Math.floor(dev.sizeBytes / chunkBytes)
    const originChunks = options.originSizeBytes === undefined ? Infinity : Math.ceil(options.originSizeBytes / chunkBytes)
    const seenOld = new Set<number>()
    const seenNew = new Set<number>()
    scan: for (let k = 0; ; k++) {
      const at = areaChunk(layout, k)
      if (at >= cowChunks) {
        report(`metadata area ${k} (chunk ${at}) is missing: the file ends before it`)
        break
      }
      let area
      try {
        area = decodeArea(await dev.read(at * chunkBytes, chunkBytes))
      } catch (err) {
        report(`metadata area ${k}: ${(err as Error).message}`)
        break
      }
      for (const [i, { oldChunk, newChunk }] of area.entries.entries()) {
        const where = `area ${k} entry ${i}`
        const found: string[] = []
        if (newChunk >= cowChunks) found.push(`${where}: COW chunk ${newChunk} is beyond the end of the file`)
        else if (isMetadataChunk(layout, newChunk)) found.push(`${where}: COW chunk ${newChunk} is a metadata chunk`)
        if (oldChunk >= originChunks) found.push(`${where}: origin chunk ${oldChunk} is beyond the end of the origin (${originChunks} chunks)`)
        if (seenOld.has(oldChunk)) found.push(`${where}: origin chunk ${oldChunk} appears twice`)
        if (seenNew.has(newChunk)) found.push(`${where}: COW chunk ${newChunk} is used twice`)
        for (const problem of found) if (!report(problem)) break scan
        seenOld.add(oldChunk)
        seenNew.add(newChunk)
      }
      if (!area.full) break
    }
  } finally {
    await dev.close()
  }
  if (more) problems.push(`more problems not listed (check stops after ${MAX_PROBLEMS})`)
  return problems
}

/**
 * Checks the persistent COW files of a volume (or of one snapshot) straight from the manifest,
 * without opening the volume: usable on a volume that no longer opens.
 */
export async function checkVolumeFiles(dirPath: string, snapshot: string | null): Promise<{ clean: boolean; problems: string[] }> {
  const dir = resolve(dirPath)
  const manifest = await readManifest(dir)
  // A reader's lock: files an owner is writing (an offline merge, a write) would read as damage.
  // A volume on a shared store may be written from another host, where no flock reaches: there
  // the check holds the volume's lease, so it refuses while a live owner serves it anywhere.
  const owner = await acquireOwnership(dir, manifest, { shared: true })
  try {
    return await checkRecords(dir, manifest, snapshot)
  } finally {
    await owner.release()
  }
}

async function checkRecords(dir: string, manifest: Manifest, snapshot: string | null): Promise<{ clean: boolean; problems: string[] }> {
  const records = snapshot ? manifest.snapshots.filter((r) => r.name === snapshot) : manifest.snapshots
  if (snapshot && records.length === 0) throw new SnapError('SNAP_NOT_FOUND', `no snapshot '${snapshot}' in volume ${dir}`)
  const problems: string[] = []
  for (const r of records) {
    if (r.store !== 'persistent') continue
    let path = cowPathOf(dir, r)
    try {
      if (!isExternal(r)) path = await resolveInside(dir, r.cowFile, true)
    } catch (err) {
      problems.push(`${r.name}: ${(err as Error).message}`)
      continue
    }
    for (const p of await checkCow(path, { originSizeBytes: manifest.sizeBytes })) problems.push(`${r.name}: ${p}`)
  }
  return { clean: problems.length === 0, problems }
}
