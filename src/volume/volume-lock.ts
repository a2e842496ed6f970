/**
 * One process owns a volume at a time. The lock is a kernel flock(2) on `VOL/lock`, as LVM locks a
 * volume group: taking it is one atomic system call, so two processes can never both win, and the
 * kernel drops it when the last descriptor of the lock's open file description closes — that is,
 * the moment the owner exits, however it exits (SIGKILL, crash, power loss: nothing on disk to
 * clean up). A PID in a file cannot give either property: a dead PID must be detected and the file
 * replaced, which races, and a reused PID looks alive forever.
 *
 * Node has no flock(), so the system call is made by util-linux's flock(1) on a descriptor this
 * process opened and passes to it: a flock belongs to the open file description, which the child
 * shares, so the lock stays with this process's descriptor after flock(1) exits. Nothing runs
 * beside the owner while it holds the lock. The descriptor is close-on-exec, so processes this one
 * spawns later never inherit (and never prolong) the lock.
 *
 * The file is never deleted (unlinking a flocked file lets a newcomer lock a fresh inode while the
 * owner still holds the old one). Its content — the owner's PID — is only for messages.
 */
import { spawn } from 'node:child_process'
import { constants } from 'node:fs'
import { type FileHandle, open, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { SnapError } from '../errors.js'
import { processExists } from '../util/process-exists.js'

export const LOCK_FILE = 'lock'

/** flock(1)'s exit status when the lock is held by someone else (EX_TEMPFAIL). */
const CONFLICT_EXIT = 75


/** The PID the current owner recorded, when it is a live process; for messages only. */
export async function lockOwner(dir: string): Promise<number | null> {
  try {
    const pid = Number.parseInt(await readFile(join(dir, LOCK_FILE), 'utf8'), 10)
    return Number.isSafeInteger(pid) && pid > 0 && processExists(pid) ? pid : null
  } catch {
    return null
  }
}

/**
 * Runs flock(1) on `handle`'s descriptor: true when this process now holds the lock (exclusive,
 * or shared for readers such as `check`) on the file (or block device) open there, false when
 * someone else holds a conflicting one.
 */
export function flockNonBlocking(handle: FileHandle, path: string, mode: '--exclusive' | '--shared' = '--exclusive'): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const child = spawn('flock', [mode, '--nonblock', '--conflict-exit-code', String(CONFLICT_EXIT), '3'], {
      stdio: ['ignore', 'ignore', 'pipe', handle.fd],
    })
    let stderr = ''
    child.stderr?.setEncoding('utf8').on('data', (text: string) => (stderr += text))
    child.once('error', (err) => {
      const why = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'flock(1) from util-linux is not installed' : err.message
      reject(new SnapError('SNAP_IO', `cannot lock ${path}: ${why}`, { cause: err }))
    })
    child.once('close', (code) => {
      if (code === 0) resolve(true)
      else if (code === CONFLICT_EXIT) resolve(false)
      else reject(new SnapError('SNAP_IO', `cannot lock ${path}: ${stderr.trim() || `flock exited with ${code}`}`))
    })
  })
}

export class VolumeLock {
  private readonly handle: FileHandle
  private released = false

  private constructor(handle: FileHandle) {
    this.handle = handle
  }

  static async acquire(dir: string): Promise<VolumeLock> {
    const path = join(dir, LOCK_FILE)
    // O_NOFOLLOW: a symlink planted at VOL/lock must not make us truncate the file it points to.
    const handle = await open(path, constants.O_RDWR | constants.O_CREAT | constants.O_NOFOLLOW, 0o600).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ELOOP') throw new SnapError('SNAP_BUSY', `cannot lock volume ${dir}: ${path} is a symbolic link`, { details: { path: dir } })
      throw new SnapError('SNAP_IO', `cannot lock volume ${dir}: ${err.message}`, { cause: err, details: { path: dir } })
    })
    let held = false
    try {
      held = await flockNonBlocking(handle, path)
      if (!held) {
        const owner = await lockOwner(dir)
        const who = owner === null ? 'another process' : `process ${owner}`
        throw new SnapError('SNAP_BUSY', `volume ${dir} is in use by ${who}`, { details: { path: dir } })
      }
      await handle.truncate(0)
      await handle.write(String(process.pid), 0)
      return new VolumeLock(handle)
    } catch (err) {
      await handle.close().catch(() => {}) // releases the lock too, if it was taken
      throw err
    }
  }

  /**
   * A reader's lock, for looking at the volume's files without opening the volume (`check`): it
   * fails (SNAP_BUSY) while an owner holds the volume, and while it is held nobody can take the
   * volume. Readers share it. Needs only read access: no PID is written. Null when the volume has
   * no lock file (nobody ever opened it, so nobody owns it).
   */
  static async acquireShared(dir: string): Promise<{ release(): Promise<void> } | null> {
    const path = join(dir, LOCK_FILE)
    let handle: FileHandle
    try {
      handle = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW)
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null
      if ((err as NodeJS.ErrnoException).code === 'ELOOP') throw new SnapError('SNAP_BUSY', `cannot lock volume ${dir}: ${path} is a symbolic link`, { details: { path: dir } })
      throw new SnapError('SNAP_IO', `cannot lock volume ${dir}: ${(err as Error).message}`, { cause: err, details: { path: dir } })
    }
    try {
      if (!(await flockNonBlocking(handle, path, '--shared'))) {
        const owner = await lockOwner(dir)
        throw new SnapError('SNAP_BUSY', `volume ${dir} is in use by ${owner === null ? 'another process' : `process ${owner}`}`, { details: { path: dir } })
      }
    } catch (err) {
      await handle.close().catch(() => {})
      throw err
    }
    return { release: () => handle.close().catch(() => {}) }
  }

  async release(): Promise<void> {
    if (this.released) return
    this.released = true
    // Clear the PID while still holding the lock, so a later reader never names a stale owner.
    await this.handle.truncate(0).catch(() => {})
    await this.handle.close().catch(() => {})
  }
}
