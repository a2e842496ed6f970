/**
 * Real NBD servers (nbdkit, qemu-nbd) as child processes on Unix sockets for client tests. Each
 * runs in the foreground as our child, is stopped by its PID, and is ready once its socket
 * accepts a connection.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { rm } from 'node:fs/promises'
import net from 'node:net'

export class PeerServer {
  readonly socketPath: string
  private child: ChildProcess | null = null
  private readonly command: string
  private readonly args: readonly string[]
  stderr = ''

  constructor(command: string, args: readonly string[], socketPath: string) {
    this.command = command
    this.args = args
    this.socketPath = socketPath
  }

  /** nbdkit PLUGIN ARGS… on `socketPath` (foreground, dies with us). */
  static nbdkit(socketPath: string, pluginArgs: readonly string[], extra: readonly string[] = []): PeerServer {
    return new PeerServer('nbdkit', ['-f', '--exit-with-parent', '-U', socketPath, ...extra, ...pluginArgs], socketPath)
  }

  /** qemu-nbd serving a raw file on `socketPath`, kept up across clients (-t). */
  static qemuNbd(socketPath: string, file: string, extra: readonly string[] = []): PeerServer {
    return new PeerServer('qemu-nbd', ['-k', socketPath, '-f', 'raw', '-t', ...extra, file], socketPath)
  }

  uri(exportName = ''): string {
    return `nbd+unix:///${exportName}?socket=${this.socketPath}`
  }

  get pid(): number | undefined {
    return this.child?.pid
  }

  async start(): Promise<this> {
    await rm(this.socketPath, { force: true })
    const child = spawn(this.command, this.args, { stdio: ['ignore', 'ignore', 'pipe'] })
    this.child = child
    child.stderr?.on('data', (d: Buffer) => (this.stderr += d.toString()))
    const exited = new Promise<never>((_, reject) =>
      child.once('exit', (code) => reject(new Error(`${this.command} exited (${code}) before serving: ${this.stderr}`))),
    )
    exited.catch(() => {})
    for (let i = 0; ; i++) {
      if (await connectable(this.socketPath)) break
      await Promise.race([new Promise((r) => setTimeout(r, 10)), exited])
      if (i > 1000) throw new Error(`${this.command} did not start serving on ${this.socketPath}: ${this.stderr}`)
    }
    return this
  }

  /** Sends `signal` to the server by PID; for SIGKILL and SIGTERM, waits until it is gone. */
  async signal(signal: NodeJS.Signals): Promise<void> {
    const child = this.child
    if (child === null || child.exitCode !== null || child.signalCode !== null) return
    const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()))
    process.kill(child.pid!, signal)
    if (signal === 'SIGKILL' || signal === 'SIGTERM') await gone
  }

  async stop(): Promise<void> {
    await this.signal('SIGKILL')
    this.child = null
  }
}

function connectable(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.createConnection({ path })
    socket.once('connect', () => {
      socket.destroy()
      resolve(true)
    })
    socket.once('error', () => resolve(false))
  })
}
