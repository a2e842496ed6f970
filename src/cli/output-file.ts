/**
 * Where `read --output FILE` puts its bytes: a temporary file next to FILE, synced and renamed
 * over FILE only once the whole read succeeded, so a failed read (missing or merging snapshot,
 * server gone, Ctrl-C) leaves an existing FILE as it was and never leaves a partial one.
 *
 * A FILE that exists and is not a regular file (a block device, a FIFO, /dev/stdout) is written
 * directly: renaming over it would replace the node instead of filling it.
 */
import { chmod, open, rename, stat, unlink, type FileHandle } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { SnapError, asSnapError } from '../errors.js'

export type WriteOutput = (data: Uint8Array) => Promise<void>

export async function writeOutputFile(path: string, produce: (write: WriteOutput) => Promise<void>): Promise<void> {
  const existing = await stat(path).catch(() => null)
  if (existing && !existing.isFile()) {
    const handle = await open(path, 'w')
    try {
      await produce(appender(handle))
    } finally {
      await handle.close()
    }
    return
  }
  const temp = join(dirname(path), `.${basename(path)}.blocksnap-${process.pid}.tmp`)
  let handle: FileHandle
  try {
    handle = await open(temp, 'wx')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new SnapError('SNAP_NOT_FOUND', `directory ${dirname(path)} does not exist`)
    throw asSnapError(err, `cannot write ${path}`)
  }
  let renamed = false
  try {
    if (existing) await chmod(temp, existing.mode & 0o7777)
    await produce(appender(handle))
    await handle.datasync()
    await handle.close()
    await rename(temp, path)
    renamed = true
  } finally {
    if (!renamed) {
      await handle.close().catch(() => {})
      await unlink(temp).catch(() => {})
    }
  }
}

/** Sequential writes at the file position: a FIFO or terminal has no offsets. */
function appender(handle: FileHandle): WriteOutput {
  return async (data) => {
    for (let done = 0; done < data.length; ) {
      done += (await handle.write(data, done, data.length - done, null)).bytesWritten
    }
  }
}
