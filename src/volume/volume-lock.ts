/**
 * One process owns a volume at a time. Node has no flock(), so the lock is a file created with
 * O_EXCL holding the owner's PID; a lock whose PID is no longer alive is stale and taken over.
 */
import { open, readFile, unlink } from 'node:fs/promises'
import { join } from 'node:path'
import { SnapError } from '../errors.js'

export const LOCK_FILE = 'lock'

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

export async function lockOwner(dir: string): Promise<number | null> {
  try {
    const pid = Number.parseInt(await readFile(join(dir, LOCK_FILE), 'utf8'), 10)
    return Number.isSafeInteger(pid) && pid > 0 && alive(pid) ? pid : null
  } catch {
    return null
  }
}

export class VolumeLock {
  private readonly path: string
  private released = false

  private constructor(path: string) {
    this.path = path
  }

  static async acquire(dir: string): Promise<VolumeLock> {
    const path = join(dir, LOCK_FILE)
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const handle = await open(path, 'wx')
        await handle.writeFile(String(process.pid))
        await handle.close()
        return new VolumeLock(path)
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
        const owner = await lockOwner(dir)
        if (owner !== null) throw new SnapError('SNAP_BUSY', `volume ${dir} is in use by process ${owner}`, { details: { path: dir } })
        await unlink(path).catch(() => {}) // stale: its owner is gone
      }
    }
    throw new SnapError('SNAP_BUSY', `volume ${dir} is locked`, { details: { path: dir } })
  }

  async release(): Promise<void> {
    if (this.released) return
    this.released = true
    await unlink(this.path).catch(() => {})
  }
}
