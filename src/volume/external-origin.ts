/**
 * Origins used in place (`create VOL --origin PATH`): an image file or block device that stays
 * where it is, is written only through the volume, and is never deleted by blocksnap.
 *
 * Design notes:
 * - While a volume has its origin open it holds a flock(2) on it (as VolumeLock does on
 *   VOL/lock, through flock(1); a flock on a block device node works the same), so a second
 *   volume over the same origin cannot open at the same time, whoever created it and whatever
 *   the registry says. The lock dies with the process; nothing on disk to clean up.
 * - A block device is also opened O_EXCL (FileDevice `exclusive`), the kernel's own claim: it
 *   refuses a device that is mounted or held by device-mapper or md — writes that bypass
 *   blocksnap would silently change what the snapshots show — and refuses those while the volume
 *   is open.
 * - An origin named by a device URI (an NBD export) has no local file to lock: the flock is
 *   taken on a lock file named by the URI's identity in blocksnap's state directory instead, so
 *   two volumes of this host (and state directory) never have one export open at once. Other
 *   hosts are not kept out by it.
 * - Which other (closed) volume uses an origin is origin-registry.ts's business.
 */
import { constants } from 'node:fs'
import { type FileHandle, mkdir, open, readFile, readdir, realpath, stat } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import type { BlockDevice } from '../device/block-device.js'
import { FileDevice } from '../device/file-device.js'
import { majorMinor } from '../device/block-device-size.js'
import { type ImageFile, identityOf, identityOfPath } from '../device/image-file.js'
import { SnapError, badArgument } from '../errors.js'
import { SNAP_MAGIC } from '../format/layout.js'
import { MANIFEST_FILE } from './manifest.js'
import { originLockFile, originOwner } from './origin-registry.js'
import { flockNonBlocking } from './volume-lock.js'

const changed = (path: string) =>
  new SnapError('SNAP_BUSY', `origin ${path} changed while it was being opened (renamed or replaced): try again`, { details: { path } })

/** A flock held on an in-place origin for as long as its volume has it open. */
export class OriginLock {
  private readonly handle: FileHandle
  private released = false

  private constructor(handle: FileHandle) {
    this.handle = handle
  }

  /**
   * Locks origin `path`, which must still be the storage `identity`, for volume `dir`; refused
   * while another volume holds it.
   */
  static async acquire(path: string, identity: string, dir: string): Promise<OriginLock> {
    const handle = await open(path, constants.O_RDONLY).catch((err: NodeJS.ErrnoException) => {
      throw new SnapError(err.code === 'ENOENT' ? 'SNAP_NOT_FOUND' : 'SNAP_IO', `cannot open origin ${path}: ${err.message}`, { cause: err, details: { path } })
    })
    try {
      if (identityOf(await handle.stat({ bigint: true })) !== identity) throw changed(path)
      if (!(await flockNonBlocking(handle, path))) {
        // The registry names the holder unless it names `dir` itself (a copy of its directory, or
        // a claim in another state directory holds the lock).
        const owner = await originOwner(identity)
        const who = owner === null || owner === dir ? 'another open volume' : `volume ${owner}`
        throw new SnapError('SNAP_BUSY', `origin ${path} is in use by ${who}`, { details: { path } })
      }
      return new OriginLock(handle)
    } catch (err) {
      await handle.close().catch(() => {})
      throw err
    }
  }

  /**
   * Locks origin `address`, a device URI of storage `identity`, for volume `dir`: a flock on its
   * lock file in the state directory (see the top); refused while another volume holds it.
   */
  static async acquireUri(address: string, identity: string, dir: string): Promise<OriginLock> {
    const path = originLockFile(identity)
    const handle = await mkdir(dirname(path), { recursive: true, mode: 0o700 })
      .then(() => open(path, constants.O_RDWR | constants.O_CREAT | constants.O_NOFOLLOW, 0o600))
      .catch((err: NodeJS.ErrnoException) => {
        throw new SnapError('SNAP_IO', `cannot lock origin ${address}: ${err.message} (BLOCKSNAP_STATE_DIR chooses another directory)`, { cause: err })
      })
    try {
      if (!(await flockNonBlocking(handle, path))) {
        const owner = await originOwner(identity)
        const who = owner === null || owner === dir ? 'another open volume' : `volume ${owner}`
        throw new SnapError('SNAP_BUSY', `origin ${address} is in use by ${who}`, { details: { path: address } })
      }
      return new OriginLock(handle)
    } catch (err) {
      await handle.close().catch(() => {})
      throw err
    }
  }

  async release(): Promise<void> {
    if (this.released) return
    this.released = true
    await this.handle.close().catch(() => {})
  }
}

/**
 * Opens in-place origin `path` (storage `image`) as the volume's device: a block device
 * exclusively, and only if it is still the storage that was locked.
 */
export async function openExternalOrigin(path: string, image: ImageFile, options: { readOnly?: boolean } = {}): Promise<FileDevice> {
  const dev = await FileDevice.open(path, { exclusive: image.kind === 'block', ...(options.readOnly ? { readOnly: true } : {}) })
  try {
    if (identityOf(await dev.stat()) !== image.identity) throw changed(path)
    return dev
  } catch (err) {
    await dev.close().catch(() => {})
    throw err
  }
}

/**
 * Refuses, at create, an origin that is part of a volume: a file inside a volume directory (an
 * origin.img, a COW under snapshots/), a loop device over one, or anything holding a snapshot
 * COW header (a COW imported in place lives anywhere). Reads the first sector through `dev`.
 */
export async function refuseVolumePart(path: string, image: ImageFile, dev: FileDevice): Promise<void> {
  const file = image.kind === 'file' ? await realpath(path) : await loopBackingFile(path)
  const volumeDir = file === null ? null : await enclosingVolume(file)
  if (volumeDir !== null) throw badArgument(`origin ${path} is inside volume ${volumeDir}${file === path ? '' : ` (${file})`}: a volume's files are not an origin`)
  if (await holdsCowHeader(dev)) throw badArgument(`origin ${path} holds a snapshot COW (its header says SnAp): a COW is not an origin`)
}

/** True when `dev` starts with a snapshot COW header's magic (valid or invalidated). */
export async function holdsCowHeader(dev: BlockDevice): Promise<boolean> {
  if (dev.sizeBytes < 4) return false
  const head = await dev.read(0, 4)
  return new DataView(head.buffer, head.byteOffset, 4).getUint32(0, true) === SNAP_MAGIC
}

/**
 * Refuses, at create, an origin whose other face another volume uses: the backing file of a loop
 * device, or a loop device over a file. They are different identities (an inode, a device
 * number) for the same bytes, so neither the registry entry nor the flock of one covers the other.
 */
export async function refuseAliasInUse(path: string, image: ImageFile): Promise<void> {
  for (const alias of await aliasesOf(path, image)) {
    const owner = await originOwner(alias.identity)
    if (owner !== null) {
      throw new SnapError('SNAP_BUSY', `origin ${path} is already used by volume ${owner} (as ${alias.path}, the same storage)`, { details: { path } })
    }
  }
}

/** The loop device's backing file, or the loop devices over the file: the same bytes by another name. */
async function aliasesOf(path: string, image: ImageFile): Promise<Array<{ path: string; identity: string }>> {
  const aliases: Array<{ path: string; identity: string }> = []
  if (image.kind === 'block') {
    const backing = await loopBackingFile(path)
    const identity = backing === null ? null : await identityOfPath(backing)
    if (backing !== null && identity !== null) aliases.push({ path: backing, identity })
    return aliases
  }
  const loops = (await readdir('/sys/block').catch(() => [] as string[])).filter((name) => name.startsWith('loop'))
  for (const loop of loops) {
    const backing = await readFile(`/sys/block/${loop}/loop/backing_file`, 'utf8').catch(() => null)
    if (backing === null || (await identityOfPath(backing.trim())) !== image.identity) continue
    const number = (await readFile(`/sys/block/${loop}/dev`, 'utf8').catch(() => '')).trim()
    if (/^\d+:\d+$/.test(number)) aliases.push({ path: `/dev/${loop}`, identity: `block ${number}` })
  }
  return aliases
}

/** The file a loop device reads, from the kernel's sysfs attribute; null for any other device. */
async function loopBackingFile(path: string): Promise<string | null> {
  const st = await stat(path, { bigint: true })
  const text = await readFile(`/sys/dev/block/${majorMinor(st.rdev)}/loop/backing_file`, 'utf8').catch(() => null)
  return text === null ? null : text.trim().replace(/ \(deleted\)$/, '')
}

/** The nearest directory above `file` holding a volume manifest, or null. */
async function enclosingVolume(file: string): Promise<string | null> {
  for (let dir = dirname(file); ; dir = dirname(dir)) {
    if (await stat(join(dir, MANIFEST_FILE)).then((s) => s.isFile(), () => false)) return dir
    if (dirname(dir) === dir) return null
  }
}
