/**
 * `blocksnap serve …` (the compiled CLI, dist/cli/bin.cjs) as a child process for the end-to-end tests: stderr is collected in
 * `log`, and start() resolves once the server logs "serving …", which it does only after the
 * control sockets and every NBD listener are up.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { join } from 'node:path'

const REPO = new URL('../..', import.meta.url).pathname

export interface ServeExit {
  readonly code: number | null
  readonly signal: NodeJS.Signals | null
}

export class ServeProcess {
  readonly child: ChildProcess
  readonly exit: Promise<ServeExit>
  /** Resolves once the process exited and its stderr is fully read into `log`. */
  readonly closed: Promise<void>
  /** Everything the server wrote to stderr so far (pino JSON lines at level info). */
  log = ''

  private constructor(child: ChildProcess) {
    this.child = child
    this.exit = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
    this.closed = new Promise((resolve) => child.once('close', () => resolve()))
    child.stderr?.on('data', (d: Buffer) => {
      this.log += d.toString('utf8')
    })
  }

  get pid(): number | undefined {
    return this.child.pid
  }

  alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null
  }

  /** Resolves once the log matches `pattern`; rejects (with the log) if the server exits first. */
  waitForLog(pattern: RegExp): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (!pattern.test(this.log)) return false
        this.child.stderr?.off('data', check)
        resolve()
        return true
      }
      if (check()) return
      this.child.stderr?.on('data', check)
      void this.closed.then(async () => {
        if (check()) return
        reject(new Error(`blocksnap serve exited (${JSON.stringify(await this.exit)}) before logging ${pattern}:\n${this.log}`))
      })
    })
  }

  /** Starts `blocksnap serve ...args`; rejects with the log if it exits or is not up in time. */
  static async start(args: readonly string[], timeoutMs = 30_000): Promise<ServeProcess> {
    const child = spawn(process.execPath, [join(REPO, 'dist', 'cli', 'bin.cjs'), 'serve', ...args], {
      cwd: REPO,
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, BLOCKSNAP_LOG_LEVEL: 'info' },
    })
    const served = new ServeProcess(child)
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL') // nobody else holds it yet to stop it
        reject(new Error(`blocksnap serve did not come up in ${timeoutMs} ms:\n${served.log}`))
      }, timeoutMs)
      child.stderr?.on('data', () => {
        if (served.log.includes('"msg":"serving ')) {
          clearTimeout(timer)
          resolve()
        }
      })
      void served.exit.then((e) => {
        clearTimeout(timer)
        reject(new Error(`blocksnap serve exited early (${JSON.stringify(e)}):\n${served.log}`))
      })
    })
    return served
  }
}
