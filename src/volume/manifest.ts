/**
 * The volume manifest (volume.json): what the directory holds. Written atomically (temp file,
 * fsync, rename, fsync of the directory), so a crash leaves either the old or the new manifest.
 *
 * The manifest is input like any other: whoever can write the directory can write it, and a
 * root `serve` or `list` must not be steered by it to files elsewhere. So the files it names are
 * confined: the origin is a plain name in the directory, a COW is `snapshots/NAME` — except an
 * origin used in place (`create --origin`, recorded as `originExternal`) and a COW imported in
 * place or put on a given device (`snapshot --cow`, recorded as `external`), each with its device
 * address: an absolute path, or a device URI (open-device.ts) that must parse. blocksnap uses
 * them but never deletes them. Anything else is refused when the manifest is read.
 */
import { constants } from 'node:fs'
import { lstat, open, readFile, rename, unlink } from 'node:fs/promises'
import { isAbsolute, join, normalize } from 'node:path'
import { deviceUriIdentity, isDeviceUri } from '../device/open-device.js'
import { SnapError } from '../errors.js'

export const MANIFEST_FILE = 'volume.json'
export const MANIFEST_VERSION = 1
/** Where the volume's own COW files live, relative to the volume directory. */
export const SNAPSHOT_DIR = 'snapshots'

export type StoreName = 'persistent' | 'transient'

export interface SnapshotRecord {
  readonly name: string
  readonly chunkSizeBytes: number
  readonly store: StoreName
  readonly overflow: boolean
  /**
   * The volume's own COW: `snapshots/NAME`, relative to the volume directory. An external COW:
   * its device address (absolute path or device URI).
   */
  readonly cowFile: string
  /**
   * Set (true) for a COW imported in place or made on a given device (`snapshot --cow`): it lives
   * outside the volume and is never deleted by blocksnap. Absent for the volume's own COWs. Manifests written before this field existed
   * marked in-place imports by an absolute cowFile alone; reading them sets it.
   */
  readonly external?: true
  /**
   * Fixed COW size in bytes (kernel behaviour), or null for a file that grows on demand. An
   * autoextend raises it once the file has grown.
   */
  readonly cowSizeBytes: number | null
  readonly createdAt: string
  /**
   * First fill warning level in percent (then every 5 % up to 95), null for none. Absent
   * (manifests written before it existed): 80 for a fixed-size COW, none otherwise.
   */
  readonly warnAtPercent?: number | null
  /** Autoextend of a fixed-size COW (LVM's threshold and percent); absent or null: none. */
  readonly autoextend?: { readonly thresholdPercent: number; readonly percent: number } | null
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
  /**
   * The volume's own origin: a file name in the volume directory. An external origin: its
   * device address (absolute path or device URI).
   */
  readonly originFile: string
  /**
   * Set (true) for an origin used in place (`create --origin`): an image file or block device
   * outside the volume, never deleted by blocksnap. Absent for the volume's own origin.
   */
  readonly originExternal?: true
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

/** True for a COW that lives outside the volume (import --in-place): used, never deleted. */
export function isExternal(record: SnapshotRecord): boolean {
  return record.external === true
}

/** The absolute path of a snapshot's COW file. */
export function cowPathOf(dir: string, record: SnapshotRecord): string {
  return isExternal(record) ? record.cowFile : join(dir, record.cowFile)
}

/** True for an origin used in place (create --origin): used, never deleted. */
export function isExternalOrigin(manifest: Manifest): boolean {
  return manifest.originExternal === true
}

/** The absolute path of the volume's origin image. */
export function originPathOf(dir: string, manifest: Manifest): string {
  return isExternalOrigin(manifest) ? manifest.originFile : join(dir, manifest.originFile)
}

/** A device URI that parses, or a clean absolute path: where an external origin or COW may be. */
function isExternalAddress(address: string): boolean {
  if (!isDeviceUri(address)) return isCleanAbsolute(address)
  try {
    deviceUriIdentity(address)
    return true
  } catch {
    return false
  }
}

/** One path component: no separator, not `.` or `..`, no NUL. */
function isPlainName(name: string): boolean {
  return name.length > 0 && name !== '.' && name !== '..' && !name.includes('/') && !name.includes('\0')
}

/** An absolute path with nothing to resolve (`.`, `..`, doubled slashes), no NUL. */
function isCleanAbsolute(path: string): boolean {
  return isAbsolute(path) && normalize(path) === path && !path.includes('\0')
}

function validateManifest(value: unknown, dir: string): Manifest {
  const bad = (why: string) => new SnapError('SNAP_CORRUPT_METADATA', `${join(dir, MANIFEST_FILE)}: ${why}`)
  if (typeof value !== 'object' || value === null) throw bad('not an object')
  const m = value as Record<string, unknown>
  if (m.version !== MANIFEST_VERSION) throw bad(`unsupported version ${String(m.version)}`)
  if (!Number.isSafeInteger(m.sizeBytes) || (m.sizeBytes as number) < 0) throw bad('bad sizeBytes')
  if (typeof m.originFile !== 'string') throw bad('bad originFile')
  if (m.originExternal !== undefined && m.originExternal !== true) throw bad(`originExternal ${JSON.stringify(m.originExternal)} must be true or absent`)
  // Only the explicit marker makes an absolute origin path acceptable: no older manifest had one.
  if (m.originExternal === true) {
    if (!isExternalAddress(m.originFile)) throw bad(`external originFile ${JSON.stringify(m.originFile)} is neither a clean absolute path nor a valid device URI`)
  } else if (!isPlainName(m.originFile)) {
    throw bad(`originFile ${JSON.stringify(m.originFile)} is not a file name inside the volume directory`)
  }
  if (!Array.isArray(m.snapshots)) throw bad('bad snapshots')
  const snapshots = (m.snapshots as unknown[]).map((s) => validateRecord(s, bad))
  if (m.merge !== null && m.merge !== undefined) {
    const merge = m.merge as Record<string, unknown>
    if (typeof merge.snapshot !== 'string') throw bad('bad merge record')
    const rate = merge.rateBytesPerSecond
    if (rate !== undefined && rate !== null && !(typeof rate === 'number' && Number.isFinite(rate) && rate > 0)) throw bad('bad merge rate')
  }
  return { ...(m as unknown as Manifest), snapshots }
}

function validateRecord(value: unknown, bad: (why: string) => SnapError): SnapshotRecord {
  if (typeof value !== 'object' || value === null) throw bad('bad snapshot record')
  const r = value as Record<string, unknown>
  if (typeof r.name !== 'string' || typeof r.cowFile !== 'string' || !Number.isSafeInteger(r.chunkSizeBytes)) {
    throw bad('bad snapshot record')
  }
  if (r.store !== 'persistent' && r.store !== 'transient') throw bad(`bad store for ${r.name}`)
  const of = `of snapshot ${JSON.stringify(r.name)}`
  if (r.external !== undefined && r.external !== true) throw bad(`external ${JSON.stringify(r.external)} ${of} must be true or absent`)
  validateFillFields(r, of, bad)
  const cowFile = r.cowFile
  // Older manifests recorded an in-place import by its absolute path alone; only a persistent
  // COW can be imported, so an absolute transient one was never written by blocksnap.
  const external = r.external === true || (r.store === 'persistent' && isAbsolute(cowFile))
  if (external) {
    if (r.store !== 'persistent') throw bad(`external cowFile ${JSON.stringify(cowFile)} ${of}: only persistent COWs live outside the volume`)
    if (!isExternalAddress(cowFile)) throw bad(`external cowFile ${JSON.stringify(cowFile)} ${of} is neither a clean absolute path nor a valid device URI`)
    return { ...(r as unknown as SnapshotRecord), external: true }
  }
  const [folder, file, ...rest] = cowFile.split('/')
  if (folder !== SNAPSHOT_DIR || file === undefined || !isPlainName(file) || rest.length > 0) {
    throw bad(`cowFile ${JSON.stringify(cowFile)} ${of} is not a file in the volume's ${SNAPSHOT_DIR}/ directory`)
  }
  return r as unknown as SnapshotRecord
}

/** Mode of a new manifest; a rewrite keeps the mode the file has (a chmod made on purpose). */
export const MANIFEST_MODE = 0o600

export async function writeManifest(dir: string, manifest: Manifest): Promise<void> {
  const path = join(dir, MANIFEST_FILE)
  const temp = `${path}.tmp-${process.pid}`
  const existing = await lstat(path).catch(() => null)
  const mode = existing?.isFile() ? existing.mode & 0o777 : MANIFEST_MODE
  // Exclusive and not following links: a symlink planted at the (guessable) temp name must not
  // make us write through it. A leftover of a crashed run with our pid is only ever a file.
  await unlink(temp).catch(() => {})
  const handle = await open(temp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, MANIFEST_MODE)
  try {
    // Exactly the mode chosen, whatever the umask (it could only narrow it, losing a chmod).
    await handle.chmod(mode)
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

function validateFillFields(r: Record<string, unknown>, of: string, bad: (why: string) => SnapError): void {
  const wholeIn = (v: unknown, min: number, max: number) => typeof v === 'number' && Number.isSafeInteger(v) && v >= min && v <= max
  if (r.warnAtPercent !== undefined && r.warnAtPercent !== null && !wholeIn(r.warnAtPercent, 1, 99)) {
    throw bad(`warnAtPercent ${JSON.stringify(r.warnAtPercent)} ${of} must be a whole percentage from 1 to 99 or null`)
  }
  const auto = r.autoextend
  if (auto === undefined || auto === null) return
  const a = auto as Record<string, unknown>
  if (typeof auto !== 'object' || !wholeIn(a.thresholdPercent, 1, 99) || !wholeIn(a.percent, 1, Number.MAX_SAFE_INTEGER) || r.cowSizeBytes === null) {
    throw bad(`autoextend ${JSON.stringify(auto)} ${of} must be { thresholdPercent: 1-99, percent: at least 1 } on a fixed-size COW`)
  }
}
