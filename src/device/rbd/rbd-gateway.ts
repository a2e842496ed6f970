/**
 * A private NBD gateway to one RBD image: `qemu-nbd` with qemu's rbd driver, serving the image
 * on a unix socket in a fresh 0700 directory that only this process knows about.
 *
 * Design notes:
 * - There is no librbd binding for Node, so librbd runs inside qemu-nbd and blocksnap speaks NBD
 *   to it. The gateway is this process's RADOS client for the image: its PID is what a lease or
 *   a fence (the OSD blocklist) has to know about.
 * - `setpriv --pdeathsig KILL` (util-linux) makes the kernel kill the gateway when the process
 *   that spawned it dies, even by SIGKILL, so a crashed blocksnap never leaves a writer behind.
 *   The signal follows the spawning thread; Node spawns from its main thread, which lives as
 *   long as the process does. setpriv execs qemu-nbd, so the child's PID is the gateway's.
 * - qemu-nbd listens before it opens the image but sends the NBD greeting only once the image
 *   is open, so the greeting is the readiness signal; a gateway that exits first failed to open
 *   the image, and its last stderr line says why.
 * - `-t` keeps the gateway up across client connections (the NBD client reconnects), `-e 4`
 *   lets up to four connections share it (qemu-nbd then advertises multi-conn), `--cache=none`
 *   turns librbd's cache off so an acknowledged write is in RADOS, not in this host's memory.
 * - The socket directory is named after this process (`blocksnap-rbd-PID-…`). A process that
 *   exits without closing its devices removes its directories on 'exit'; one killed outright
 *   cannot, so each process's first gateway removes the directories of processes that are gone.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { rmSync } from 'node:fs'
import { mkdtemp, readdir, rm } from 'node:fs/promises'
import net from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { SnapError, ioError } from '../../errors.js'
import { type RbdAddress, qemuRbdFilename } from './rbd-address.js'
import { processExists } from '../../util/process-exists.js'

export interface RbdGatewayOptions {
  readonly readOnly?: boolean
  /** Connections the gateway accepts at once (qemu-nbd -e; default 4). */
  readonly sharedConnections?: number
  /** How long the image may take to open (default 60 s: librbd waits minutes for a dead cluster). */
  readonly startTimeoutMs?: number
}

const POLL_MS = 20
const DIR_PREFIX = 'blocksnap-rbd-'

/** Socket directories of this process's running gateways, removed if the process exits with them. */
const liveDirs = new Set<string>()
let swept = false

function removeLiveDirs(): void {
  for (const dir of liveDirs) rmSync(dir, { recursive: true, force: true })
}

/** Removes the socket directories that processes killed before closing their gateways left behind. */
async function sweepDeadOwners(): Promise<void> {
  if (swept) return
  swept = true
  process.once('exit', removeLiveDirs)
  const names = await readdir(tmpdir()).catch(() => [] as string[])
  for (const name of names) {
    const owner = new RegExp(`^${DIR_PREFIX}(\\d+)-`).exec(name)?.[1]
    if (owner === undefined || Number(owner) === process.pid || processExists(Number(owner))) continue
    await rm(join(tmpdir(), name), { recursive: true, force: true }).catch(() => {})
  }
}

const STOP_GRACE_MS = 5000

export class RbdGateway {
  readonly address: RbdAddress
  readonly socketPath: string
  private readonly dir: string
  private readonly child: ChildProcess
  private readonly exited: Promise<void>
  private stopping: Promise<void> | null = null
  private readonly stderr: () => string

  private constructor(address: RbdAddress, dir: string, child: ChildProcess, exited: Promise<void>, stderr: () => string) {
    this.address = address
    this.stderr = stderr
    this.dir = dir
    this.socketPath = join(dir, 'nbd.sock')
    this.child = child
    this.exited = exited
  }

  /** PID of qemu-nbd, the process that talks to RADOS for this image. */
  get pid(): number {
    return this.child.pid!
  }

  /** True while the gateway process runs. */
  get alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null
  }

  /** "exited with status N: LAST STDERR LINE" or "was killed by SIGNAL", for messages. */
  exitDescription(): string {
    if (this.alive) return 'is running'
    const how = this.child.signalCode !== null ? `was killed by ${this.child.signalCode}` : `exited with status ${this.child.exitCode}`
    const last = this.stderr().trim().split('\n').pop()?.trim() ?? ''
    return last === '' ? how : `${how}: ${last}`
  }

  /** The NBD URI clients use to reach the image. */
  get uri(): string {
    return `nbd+unix:///?socket=${this.socketPath}`
  }

  /** Starts qemu-nbd on `address` and resolves once the image is open and served. */
  static async start(address: RbdAddress, options: RbdGatewayOptions = {}): Promise<RbdGateway> {
    await sweepDeadOwners()
    const dir = await mkdtemp(join(tmpdir(), `${DIR_PREFIX}${process.pid}-`)) // mkdtemp makes it 0700
    liveDirs.add(dir)
    const socketPath = join(dir, 'nbd.sock')
    const args = [
      '--pdeathsig',
      'KILL',
      '--',
      'qemu-nbd',
      '-t',
      '-e',
      String(options.sharedConnections ?? 4),
      '-f',
      'raw',
      '--cache=none',
      '--discard=unmap',
      ...(options.readOnly === true ? ['-r'] : []),
      `--socket=${socketPath}`,
      qemuRbdFilename(address),
    ]
    let stderr = ''
    let spawnError: NodeJS.ErrnoException | null = null
    const child = spawn('setpriv', args, { stdio: ['ignore', 'ignore', 'pipe'] })
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString('utf8')))
    const exited = new Promise<void>((resolve) => {
      child.once('error', (err) => {
        spawnError = err
        resolve()
      })
      child.once('close', () => resolve())
    })
    const gateway = new RbdGateway(address, dir, child, exited, () => stderr)
    const timeoutMs = options.startTimeoutMs ?? 60_000
    try {
      const ready = await untilGreeted(socketPath, exited, timeoutMs)
      if (ready) return gateway
      if (gateway.alive) {
        throw ioError(`${address.text}: qemu-nbd did not open the image within ${Math.round(timeoutMs / 1000)} s (is the Ceph cluster reachable?)`)
      }
      throw startFailure(address, spawnError, child.exitCode, stderr)
    } catch (err) {
      await gateway.stop(0) // it never served a byte: nothing to flush
      throw err
    }
  }

  /** Stops the gateway by PID (SIGTERM, then SIGKILL after `graceMs`) and removes its directory. */
  stop(graceMs = STOP_GRACE_MS): Promise<void> {
    this.stopping ??= (async () => {
      if (this.alive && this.child.pid !== undefined) {
        this.child.kill(graceMs === 0 ? 'SIGKILL' : 'SIGTERM')
        const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs)
        await this.exited
        clearTimeout(timer)
      }
      await this.exited
      await rm(this.dir, { recursive: true, force: true })
      liveDirs.delete(this.dir)
    })()
    return this.stopping
  }
}

/**
 * Polls until the gateway on `path` sends the NBD greeting (true), or it exits or the time is up
 * (false). qemu-nbd listens before it opens the image but greets only once the image is open, so
 * an accepted connection alone proves nothing.
 */
async function untilGreeted(path: string, exited: Promise<void>, timeoutMs: number): Promise<boolean> {
  let gone = false
  void exited.then(() => (gone = true))
  const deadline = Date.now() + timeoutMs
  while (!gone && Date.now() < deadline) {
    if (await greets(path, deadline - Date.now())) return true
    await Promise.race([new Promise((r) => setTimeout(r, POLL_MS)), exited])
  }
  return false
}

const GREETING = Buffer.from('NBDMAGIC')

function greets(path: string, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.createConnection({ path })
    let received = Buffer.alloc(0)
    const done = (ok: boolean) => {
      clearTimeout(timer)
      socket.destroy()
      resolve(ok)
    }
    const timer = setTimeout(() => done(false), Math.max(0, timeoutMs))
    socket.on('data', (d: Buffer) => {
      received = Buffer.concat([received, d])
      if (received.length >= GREETING.length) done(received.subarray(0, GREETING.length).equals(GREETING))
    })
    socket.once('error', () => done(false))
    socket.once('close', () => done(false))
  })
}

/** One line saying why the gateway did not come up, in qemu-nbd's own words where it gave some. */
function startFailure(address: RbdAddress, spawnError: NodeJS.ErrnoException | null, exitCode: number | null, stderr: string): SnapError {
  if (spawnError?.code === 'ENOENT') {
    return new SnapError('SNAP_NOT_SUPPORTED', `${address.text}: setpriv not found (install util-linux): RBD images are opened through a qemu-nbd gateway`)
  }
  if (spawnError !== null) return ioError(`${address.text}: cannot start the qemu-nbd gateway: ${spawnError.message}`, spawnError)
  const last = stderr.trim().split('\n').pop()?.trim() ?? ''
  if (exitCode === 127 || /failed to execute qemu-nbd/.test(last)) {
    return new SnapError('SNAP_NOT_SUPPORTED', `${address.text}: qemu-nbd not found (install qemu-utils and qemu-block-extra)`)
  }
  if (/Unknown protocol 'rbd'|Unknown driver 'rbd'/i.test(last)) {
    return new SnapError('SNAP_NOT_SUPPORTED', `${address.text}: qemu has no rbd driver (install qemu-block-extra)`)
  }
  // "qemu-nbd: Failed to blk_new_open 'rbd:…': error reading header from IMG: No such file or directory"
  const reason = last.replace(/^qemu-nbd:\s*/, '').replace(/^Failed to blk_new_open '[^']*':\s*/, '') || `qemu-nbd exited with status ${exitCode}`
  const code = /No such file or directory/.test(reason) ? 'SNAP_NOT_FOUND' : 'SNAP_IO'
  return new SnapError(code, `${address.text}: cannot open the RBD image: ${reason}`)
}
