/**
 * The size of a block device. Its stat size is 0, and Node offers neither lseek(SEEK_END) nor the
 * BLKGETSIZE64 ioctl, so the size comes from the kernel's own count in
 * /sys/dev/block/MAJOR:MINOR/size (512-byte sectors whatever the logical block size: the value
 * BLKGETSIZE64 reports, divided by 512). That is one read of a kernel attribute and never touches
 * the device's media, unlike probing reads past the end, which on a failing disk or a suspended
 * dm device can fail with EIO or block.
 */
import { readFile } from 'node:fs/promises'
import { ioError } from '../errors.js'

/** Linux dev_t → "MAJOR:MINOR" (glibc's gnu_dev_major/gnu_dev_minor bit layout). */
export function majorMinor(rdev: bigint): string {
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & 0xfffff000n)
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & 0xffffff00n)
  return `${major}:${minor}`
}

/** The size of block device number `rdev`, as the kernel reports it. */
export async function blockDeviceSizeBytes(rdev: bigint, path: string): Promise<number> {
  const attribute = `/sys/dev/block/${majorMinor(rdev)}/size`
  let text: string
  try {
    text = await readFile(attribute, 'utf8')
  } catch (err) {
    throw ioError(`block device ${path}: cannot read its size from ${attribute}: ${(err as Error).message}`, err, { path })
  }
  const sectors = Number(text.trim())
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(sectors * 512)) {
    throw ioError(`block device ${path}: ${attribute} holds '${text.trim()}', not a size in sectors`, undefined, { path })
  }
  return sectors * 512
}
