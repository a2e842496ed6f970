/**
 * The volume manifest (volume.json): what the directory holds. Written atomically (temp file,
 * fsync, rename, fsync of the directory), so a crash leaves either the old or the new manifest.
 */
import { open, readFile, rename } from 'node:fs/promises'
import { join } from 'node:path'
import { SnapError } from '../errors.js'

export const MANIFEST_FILE = 'volume.json'
export const MANIFEST_VERSION = 1

export type StoreName = 'persistent' | 'transient'

export interface SnapshotRecord {
  readonly name: string
  readonly chunkSizeBytes: number
  readonly store: StoreName
  readonly overflow: boolean
  /** Relative to the volume directory, or absolute for COWs imported in place. */
  readonly cowFile: string
  /** Fixed COW size in bytes (kernel behaviour), or null for a file that grows on demand. */
  readonly cowSizeBytes: number | null
  readonly createdAt: string
}

export interface MergeRecord {
  readonly snapshot: string
  /**
   * The user's rate limit in bytes/s, or null for none; a resumed merge runs at it. Manifests
   * written before the field existed lack it (read as null).
   */
  readonly rateBytesPerSecond?: number | null
}

export interface Manifest {
  readonly version: number
  readonly sizeBytes: number
  readonly originFile: string
  readonly snapshots: readonly SnapshotRecord[]
  readonly merge: MergeRecord | null
}

export async function readManifest(dir: string): Promise<Manifest> {
  let text: string
  try {
    text = await readFile(join(dir, MANIFEST_FILE), 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new SnapError('SNAP_NOT_FOUND', `${dir} is not a blocksnap volume (no ${MANIFEST_FILE})`, { details: { path: dir } })
    }
    throw new SnapError('SNAP_IO', `cannot read ${join(dir, MANIFEST_FILE)}: ${(err as Error).message}`)
  }
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch {
    throw new SnapError('SNAP_CORRUPT_METADATA', `${join(dir, MANIFEST_FILE)} is not valid JSON`)
  }
  return validateManifest(parsed, dir)
}

function validateManifest(value: unknown, dir: string): Manifest {
  const bad = (why: string) => new SnapError('SNAP_CORRUPT_METADATA', `${join(dir, MANIFEST_FILE)}: ${why}`)
  if (typeof value !== 'object' || value === null) throw bad('not an object')
  const m = value as Record<string, unknown>
  if (m.version !== MANIFEST_VERSION) throw bad(`unsupported version ${String(m.version)}`)
  if (!Number.isSafeInteger(m.sizeBytes) || (m.sizeBytes as number) < 0) throw bad('bad sizeBytes')
  if (typeof m.originFile !== 'string') throw bad('bad originFile')
  if (!Array.isArray(m.snapshots)) throw bad('bad snapshots')
  for (const s of m.snapshots as unknown[]) {
    const r = s as Record<string, unknown>
    if (typeof r.name !== 'string' || typeof r.cowFile !== 'string' || !Number.isSafeInteger(r.chunkSizeBytes)) {
      throw bad('bad snapshot record')
    }
    if (r.store !== 'persistent' && r.store !== 'transient') throw bad(`bad store for ${r.name}`)
  }
  if (m.merge !== null && m.merge !== undefined) {
    const merge = m.merge as Record<string, unknown>
    if (typeof merge.snapshot !== 'string') throw bad('bad merge record')
    const rate = merge.rateBytesPerSecond
    if (rate !== undefined && rate !== null && !(typeof rate === 'number' && Number.isFinite(rate) && rate > 0)) throw bad('bad merge rate')
  }
  return m as unknown as Manifest
}

export async function writeManifest(dir: string, manifest: Manifest): Promise<void> {
  const path = join(dir, MANIFEST_FILE)
  const temp = `${path}.tmp-${process.pid}`
  const handle = await open(temp, 'w')
  try {
    await handle.writeFile(`${JSON.stringify(manifest, null, 2)}\n`)
    await handle.sync()
  } finally {
    await handle.close()
  }
  await rename(temp, path)
  const dirHandle = await open(dir, 'r')
  try {
    await dirHandle.sync()
  } finally {
    await dirHandle.close()
  }
}
