/**
 * Copies of disk images that only their owner can read. copyFile gives the copy the source's
 * mode (libuv fchmods it), so an image copied from a 0644 file would be readable by every local
 * user while it is copied, and a reader who opened it then keeps the data. The copy is made in
 * a private (0700) directory beside its destination instead, made 0600, then renamed into place.
 */
import { chmod, mkdtemp, rename, rm } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'

/** Mode of the origin and COW files blocksnap creates: they hold the disk's data. */
export const IMAGE_FILE_MODE = 0o600

/** Runs `copy` into a temporary path only the owner can reach, then renames it to `dest`. */
export async function copyPrivate(dest: string, copy: (temp: string) => Promise<void>): Promise<void> {
  const staging = await mkdtemp(join(dirname(dest), '.copy-'))
  try {
    const temp = join(staging, basename(dest))
    await copy(temp)
    await chmod(temp, IMAGE_FILE_MODE)
    await rename(temp, dest)
  } finally {
    await rm(staging, { recursive: true, force: true })
  }
}
