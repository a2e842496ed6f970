/**
 * `serve --pid-file`: the server's PID, written once it serves (so a supervisor that reads it
 * finds a server that answers) and removed when it stops.
 */
import { readFile, rename, rm, writeFile } from 'node:fs/promises'
import { SnapError } from '../errors.js'

export class PidFile {
  readonly path: string
  private readonly pid: number

  private constructor(path: string, pid: number) {
    this.path = path
    this.pid = pid
  }

  /** Writes the PID whole: through a temporary file renamed over `path`, never half a number. */
  static async write(path: string, pid: number = process.pid): Promise<PidFile> {
    const tmp = `${path}.${pid}.tmp`
    try {
      await writeFile(tmp, `${pid}\n`, { mode: 0o644 })
      await rename(tmp, path)
    } catch (err) {
      await rm(tmp, { force: true }).catch(() => {})
      throw new SnapError('SNAP_BAD_ARGUMENT', `cannot write the PID file ${path}: ${(err as Error).message}`)
    }
    return new PidFile(path, pid)
  }

  /** Removes the file if it still holds this PID (another server may have taken the path since). */
  async remove(): Promise<void> {
    const text = await readFile(this.path, 'utf8').catch(() => null)
    if (text?.trim() === String(this.pid)) await rm(this.path, { force: true }).catch(() => {})
  }
}
