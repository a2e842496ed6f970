/**
 * The few cluster operations a volume lease needs, done with the Ceph command-line tools
 * (`rados`, `rbd`, `ceph` from ceph-common): there is no librados binding for Node. Each call is a
 * short-lived process with a deadline; a failure becomes a one-line SnapError naming the
 * operation and Ceph's own reason.
 *
 * Each call is a new RADOS client (a new `client.N` with a new address). That shapes the lease:
 * a cls_lock lock can be broken by anyone but renewed or unlocked only by the client that took
 * it, so the lease never renews the lock itself, only a heartbeat beside it (volume-lease.ts).
 */
import { spawn } from 'node:child_process'
import { SnapError } from '../../errors.js'

/** Where the tools connect: a pool, the cluster's config file, the client name (null: admin). */
export interface CephTarget {
  readonly pool: string
  readonly confFile: string
  readonly clientId: string | null
}

/** One holder of a cls_lock lock. */
export interface Locker {
  /** The RADOS client that took it, e.g. `client.4170` (what `lock break` needs). */
  readonly name: string
  readonly cookie: string
  readonly description: string
  readonly address: string
}

/** How long one tool run may take before it is killed: a cluster that does not answer. */
export const DEFAULT_CEPH_TIMEOUT_MS = 20_000

/** Errnos the tools print as `(N) text`, which callers treat as answers rather than failures. */
const ENOENT = 2
const EBUSY = 16
const ENODATA = 61
const EEXIST = 17

interface ToolResult {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
  /** The errno Ceph reported, when it printed one. */
  readonly errno: number | null
}

function runTool(tool: 'rados' | 'rbd' | 'ceph', args: readonly string[], timeoutMs: number): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.setEncoding('utf8').on('data', (t: string) => (stdout += t))
    child.stderr.setEncoding('utf8').on('data', (t: string) => (stderr += t))
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.once('error', (err) => {
      clearTimeout(timer)
      const why = (err as NodeJS.ErrnoException).code === 'ENOENT' ? `${tool} is not installed (install ceph-common)` : err.message
      reject(new SnapError('SNAP_IO', why, { cause: err }))
    })
    child.once('close', (code, signal) => {
      clearTimeout(timer)
      if (signal === 'SIGKILL') {
        reject(new SnapError('SNAP_IO', `${tool} ${args[0] ?? ''} did not answer within ${timeoutMs / 1000} s (is the cluster up?)`))
        return
      }
      const m = /\((\d+)\) /.exec(stderr) ?? /^Error E([A-Z]+)/m.exec(stderr)
      const errno = m && /^\d+$/.test(m[1] as string) ? Number(m[1]) : null
      resolve({ code, stdout, stderr, errno })
    })
  })
}

/** The last meaningful line of a tool's stderr, for a one-line error. */
function reason(result: ToolResult): string {
  const lines = result.stderr
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !/^error \d+: /.test(l))
  return lines[lines.length - 1] ?? `exit status ${String(result.code)}`
}

export class CephOps {
  readonly target: CephTarget
  private readonly timeoutMs: number

  constructor(target: CephTarget, options: { timeoutMs?: number } = {}) {
    this.target = target
    this.timeoutMs = options.timeoutMs ?? DEFAULT_CEPH_TIMEOUT_MS
  }

  private common(): string[] {
    const args = ['--conf', this.target.confFile]
    if (this.target.clientId !== null) args.push('--id', this.target.clientId)
    return args
  }

  private async rados(what: string, args: readonly string[], accept: readonly number[] = []): Promise<ToolResult> {
    const result = await runTool('rados', [...this.common(), '-p', this.target.pool, ...args], this.timeoutMs).catch((err: SnapError) => {
      throw new SnapError('SNAP_IO', `${what}: ${err.message}`, { cause: err })
    })
    if (result.code !== 0 && (result.errno === null || !accept.includes(result.errno))) {
      throw new SnapError('SNAP_IO', `${what}: ${reason(result)}`)
    }
    return result
  }

  /**
   * Takes exclusive lock `lock` on object `object` (creating the object) under `cookie`: true when
   * taken now, false when someone holds it. Atomic on the OSD: of two callers, one wins.
   */
  async lockGet(object: string, lock: string, cookie: string, description: string): Promise<boolean> {
    const what = `cannot take lock ${lock} on ${this.target.pool}/${object}`
    const r = await this.rados(what, ['lock', 'get', object, lock, '--lock-cookie', cookie, '--lock-description', description, '--lock-type', 'exclusive'], [EBUSY, EEXIST])
    return r.code === 0
  }

  /** The holders of `lock` on `object`: none when the object or the lock does not exist. */
  async lockInfo(object: string, lock: string): Promise<Locker[]> {
    const r = await this.rados(`cannot read lock ${lock} on ${this.target.pool}/${object}`, ['lock', 'info', object, lock, '--format', 'json'], [ENOENT])
    if (r.code !== 0) return []
    try {
      const info = JSON.parse(r.stdout) as { lockers?: { name: string; cookie: string; description?: string; addr?: string }[] }
      return (info.lockers ?? []).map((l) => ({ name: l.name, cookie: l.cookie, description: l.description ?? '', address: l.addr ?? '' }))
    } catch {
      throw new SnapError('SNAP_IO', `cannot read lock ${lock} on ${this.target.pool}/${object}: rados printed no JSON`)
    }
  }

  /** Breaks `locker`'s hold on `lock`: true when broken now, false when it was not held (any more). */
  async lockBreak(object: string, lock: string, locker: Pick<Locker, 'name' | 'cookie'>): Promise<boolean> {
    const what = `cannot break lock ${lock} on ${this.target.pool}/${object}`
    const r = await this.rados(what, ['lock', 'break', object, lock, locker.name, '--lock-cookie', locker.cookie], [ENOENT])
    return r.code === 0
  }

  /** Extended attribute `name` of `object`, or null when it (or the object) does not exist. */
  async getXattr(object: string, name: string): Promise<string | null> {
    const r = await this.rados(`cannot read ${this.target.pool}/${object}`, ['getxattr', object, name], [ENOENT, ENODATA])
    return r.code === 0 ? r.stdout : null
  }

  async setXattr(object: string, name: string, value: string): Promise<void> {
    await this.rados(`cannot write ${this.target.pool}/${object}`, ['setxattr', object, name, value])
  }

  async removeXattr(object: string, name: string): Promise<void> {
    await this.rados(`cannot write ${this.target.pool}/${object}`, ['rmxattr', object, name], [ENOENT, ENODATA])
  }

  /** Names of `object`'s extended attributes; none when it does not exist. */
  async listXattrs(object: string): Promise<string[]> {
    const r = await this.rados(`cannot read ${this.target.pool}/${object}`, ['listxattr', object], [ENOENT])
    return r.code === 0 ? r.stdout.split('\n').filter((l) => l !== '') : []
  }

  /** Addresses of the clients watching image `image` of the pool (those that have it open). */
  async imageWatchers(image: string): Promise<string[]> {
    const spec = `${this.target.pool}/${image}`
    const r = await runTool('rbd', [...this.common(), 'status', spec, '--format', 'json'], this.timeoutMs).catch((err: SnapError) => {
      throw new SnapError('SNAP_IO', `cannot list the watchers of ${spec}: ${err.message}`, { cause: err })
    })
    if (r.code !== 0) {
      if (r.errno === ENOENT) throw new SnapError('SNAP_NOT_FOUND', `RBD image ${spec} does not exist`)
      throw new SnapError('SNAP_IO', `cannot list the watchers of ${spec}: ${reason(r)}`)
    }
    try {
      const status = JSON.parse(r.stdout) as { watchers?: { address: string }[] }
      return (status.watchers ?? []).map((w) => w.address)
    } catch {
      throw new SnapError('SNAP_IO', `cannot list the watchers of ${spec}: rbd printed no JSON`)
    }
  }

  /**
   * Adds `address` to the OSD blocklist for `expireSeconds`. `ceph` answers once the monitors
   * have committed the new OSD map; from then on every OSD that sees a request carrying that map
   * (or a later one) refuses the address's requests.
   */
  async blocklistAdd(address: string, expireSeconds: number): Promise<void> {
    const r = await runTool('ceph', [...this.common(), 'osd', 'blocklist', 'add', address, String(expireSeconds)], this.timeoutMs).catch((err: SnapError) => {
      throw new SnapError('SNAP_IO', `cannot blocklist ${address}: ${err.message}`, { cause: err })
    })
    if (r.code !== 0) throw new SnapError('SNAP_IO', `cannot blocklist ${address}: ${reason(r)}`)
  }

  /** The addresses on the OSD blocklist now. */
  async blocklist(): Promise<Set<string>> {
    const r = await runTool('ceph', [...this.common(), 'osd', 'blocklist', 'ls', '--format', 'json'], this.timeoutMs).catch((err: SnapError) => {
      throw new SnapError('SNAP_IO', `cannot read the OSD blocklist: ${err.message}`, { cause: err })
    })
    if (r.code !== 0) throw new SnapError('SNAP_IO', `cannot read the OSD blocklist: ${reason(r)}`)
    // Pacific prints two JSON arrays back to back: the address entries, then the range entries.
    const text = r.stdout.trim()
    if (!text.startsWith('[')) throw new SnapError('SNAP_IO', 'cannot read the OSD blocklist: ceph printed no JSON')
    return new Set([...text.matchAll(/"addr"\s*:\s*"([^"]+)"/g)].map((m) => m[1] as string))
  }
}
