/**
 * Opening and removing the files a volume owns without leaving its directory. The manifest only
 * names paths inside the directory (manifest.ts), but whoever can write the directory can also
 * plant symbolic links in it; a root `serve` or `list` must not follow one to a file elsewhere.
 *
 * Design notes:
 * - Before opening, the path is resolved (realpath) and must lie inside the resolved directory;
 *   the resolved path is then opened with O_NOFOLLOW, and the descriptor's own path (/proc) is
 *   checked again, which catches a link swapped in between. A link that stays inside the
 *   directory is fine.
 * - FileDevice itself accepts only regular files and block devices (a FIFO would hang the reader).
 * - Removal resolves the parent directory only: unlink never follows the last component.
 */
import { realpath, unlink } from 'node:fs/promises'
import { basename, dirname, join, sep } from 'node:path'
import { FileDevice, type FileDeviceOptions } from '../device/file-device.js'
import { SnapError } from '../errors.js'

function isInside(realDir: string, path: string): boolean {
  return path.startsWith(realDir.endsWith(sep) ? realDir : realDir + sep)
}

const outside = (path: string, target: string) =>
  new SnapError('SNAP_CORRUPT_METADATA', `${path} leads outside the volume directory (to ${target})`, { details: { path } })

/**
 * Resolves `dir/relPath` through any links (the last component too if `whole`); refuses a result
 * outside `dir`. A missing last component resolves as named.
 */
export async function resolveInside(dir: string, relPath: string, whole: boolean): Promise<string> {
  const realDir = await realpath(dir)
  const path = join(dir, relPath)
  const resolved = whole
    ? await realpath(path).catch(async () => join(await realpath(dirname(path)), basename(path)))
    : join(await realpath(dirname(path)), basename(path))
  if (!isInside(realDir, resolved)) throw outside(path, resolved)
  return resolved
}

/** Opens (or creates) the volume's file `relPath`, which must lie inside `dir`. */
export async function openVolumeFile(dir: string, relPath: string, options: FileDeviceOptions = {}): Promise<FileDevice> {
  const path = join(dir, relPath)
  let resolved: string
  try {
    resolved = await resolveInside(dir, relPath, options.create === undefined)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new SnapError('SNAP_NOT_FOUND', `file ${path} does not exist`, { cause: err, details: { path } })
    }
    throw err
  }
  let dev: FileDevice
  try {
    dev = await FileDevice.open(resolved, { ...options, noFollow: true })
  } catch (err) {
    // O_NOFOLLOW met a link: a dangling one, or one swapped in after the path was resolved.
    if (((err as Error).cause as NodeJS.ErrnoException | undefined)?.code === 'ELOOP') {
      throw new SnapError('SNAP_CORRUPT_METADATA', `${path} is a symbolic link that does not resolve inside the volume directory`, { details: { path } })
    }
    throw err
  }
  try {
    const opened = await dev.openedPath()
    if (!isInside(await realpath(dir), opened)) throw outside(path, opened)
  } catch (err) {
    await dev.close().catch(() => {})
    throw err
  }
  return dev
}

/** Removes the volume's file `relPath` if it exists; never a file outside `dir`. */
export async function removeVolumeFile(dir: string, relPath: string): Promise<void> {
  let resolved: string
  try {
    resolved = await resolveInside(dir, relPath, false)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return
    throw err
  }
  await unlink(resolved).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'ENOENT') throw err
  })
}
