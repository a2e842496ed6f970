/**
 * Paths that may stand for a disk image or a COW device: regular files and block devices (sized
 * by the kernel, see block-device-size.ts). Anything else is refused. Device URIs
 * (open-device.ts) stand for images too: kind 'uri', sized by their server.
 */
import { copyFile, stat } from 'node:fs/promises'
import type { BigIntStats } from 'node:fs'
import { SnapError, badArgument, ioError } from '../errors.js'
import { blockDeviceSizeBytes, majorMinor } from './block-device-size.js'
import { FileDevice } from './file-device.js'
import { deviceUriIdentity, isDeviceUri, openDevice } from './open-device.js'

export type ImageKind = 'file' | 'block' | 'uri'

export interface ImageFile {
  readonly kind: ImageKind
  readonly sizeBytes: number
  /**
   * What makes two paths the same storage: the inode for a file, the device number for a block
   * device (/dev/mapper/x and /dev/dm-0 are different inodes for one device).
   */
  readonly identity: string
}

const COPY_PIECE_BYTES = 1024 * 1024

export function identityOf(st: BigIntStats): string {
  return st.isBlockDevice() ? `block ${majorMinor(st.rdev)}` : `inode ${st.dev}:${st.ino}`
}

/**
 * Kind, size and identity of `path` (`what` names it in errors: "image", "COW"); refuses
 * anything that is neither a regular file nor a block device.
 */
export async function statImage(path: string, what: string): Promise<ImageFile> {
  let st: BigIntStats
  try {
    st = await stat(path, { bigint: true })
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new SnapError('SNAP_NOT_FOUND', `${what} ${path} does not exist`, { details: { path } })
    }
    throw ioError(`${what} ${path}: ${(err as Error).message}`, err, { path })
  }
  if (st.isFile()) return { kind: 'file', sizeBytes: Number(st.size), identity: identityOf(st) }
  if (st.isBlockDevice()) return { kind: 'block', sizeBytes: await blockDeviceSizeBytes(st.rdev, path), identity: identityOf(st) }
  throw badArgument(`${what} ${path} is not a regular file or block device`)
}

/** Same storage, or null when `path` does not exist (a missing file backs nothing). */
export async function identityOfPath(path: string): Promise<string | null> {
  const st = await stat(path, { bigint: true }).catch(() => null)
  return st ? identityOf(st) : null
}

/**
 * What storage `address` is, comparable across addresses: a file's inode or a block device's
 * number for a path (null when nothing is there), the URI's identity for a device URI.
 */
export async function identityOfAddress(address: string): Promise<string | null> {
  return isDeviceUri(address) ? deviceUriIdentity(address) : identityOfPath(address)
}

/** statImage for any device address: a path, or a device URI (opened to learn its size). */
export async function statAddress(address: string, what: string): Promise<ImageFile> {
  if (!isDeviceUri(address)) return statImage(address, what)
  const identity = deviceUriIdentity(address)
  const dev = await openDevice(address, { readOnly: true })
  const sizeBytes = dev.sizeBytes
  await dev.close()
  return { kind: 'uri', sizeBytes, identity }
}

/**
 * Copies image `source` to a new file `dest`. A file is copied by the kernel (copyFile); a block
 * device's stat size is 0, so copyFile would copy nothing: it (or a device URI) is read in pieces, and all-zero
 * pieces are left as holes so the copy of a mostly empty disk stays sparse.
 */
export async function copyImage(source: string, image: ImageFile, dest: string): Promise<void> {
  if (image.kind === 'file') {
    await copyFile(source, dest)
    return
  }
  const from = await openDevice(source, { readOnly: true })
  try {
    const to = await FileDevice.open(dest, { create: image.sizeBytes })
    try {
      const piece = new Uint8Array(COPY_PIECE_BYTES)
      for (let at = 0; at < image.sizeBytes; at += piece.length) {
        const target = piece.subarray(0, Math.min(piece.length, image.sizeBytes - at))
        await from.readInto(target, at)
        if (target.some((b) => b !== 0)) await to.write(target, at)
      }
      await to.flush()
    } finally {
      await to.close()
    }
  } finally {
    await from.close()
  }
}
