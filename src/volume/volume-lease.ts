/**
 * Ownership of a volume on a shared store (its origin an RBD image): a lease on the cluster, so
 * that two hosts never serve one volume. The directory's flock (volume-lock.ts) cannot do this:
 * it is one kernel's lock, and another host's kernel never sees it.
 *
 * The lease is a cls_lock exclusive lock named `blocksnap` on the RADOS object
 * `blocksnap.lease.IMAGE` in the origin's pool, taken under a random token (the lock's cookie):
 * the OSD takes it atomically, so of two contenders exactly one wins. Beside it the owner keeps a
 * heartbeat, the xattr `blocksnap.heartbeat.TOKEN` (owner host, PID, a counter, its lease
 * period, the addresses of the RADOS clients its gateways use), rewritten every leaseSeconds/3.
 *
 * Whether the holder lives is judged without comparing clocks across hosts: a contender reads
 * the holder's counter and watches it for 1.5 × the holder's lease period, on its own clock. If
 * it moves, the holder lives (refused: SNAP_BUSY, unless `takeover`). If not, the holder is dead
 * or stalled, and is fenced exactly as a takeover fences it. One shortcut: an owner recorded in
 * this kernel's boot and PID namespace whose PID is gone is dead without waiting (a restart after
 * kill -9 on the same host).
 *
 * Fencing comes before anything else: every client watching one of the volume's images (the
 * contender has opened none yet, so all of them are the old owner's gateways or other readers)
 * and every address the old heartbeat recorded is put on the OSD blocklist, and only once the
 * monitors have committed it is the old lock broken and the lease taken. So writes the old owner
 * sends afterwards, however late, fail on the OSDs instead of landing over the new owner's.
 *
 * Each heartbeat is keyed by its owner's token, so an owner that lost the lease while stalled
 * and writes its heartbeat once more writes only its own dead record, never the new owner's.
 * The owner checks at every renewal that the lock still carries its token; when it does not,
 * the lease is lost: `onLost` is called once, and every later check (before each manifest write)
 * throws.
 */
import { randomBytes } from 'node:crypto'
import { readFileSync, readlinkSync } from 'node:fs'
import { hostname } from 'node:os'
import { CephOps, type CephTarget, type Locker } from '../device/rbd/ceph-ops.js'
import { type RbdAddress, cephConfOf } from '../device/rbd/rbd-address.js'
import { SnapError, isSnapError } from '../errors.js'
import { processExists } from '../util/process-exists.js'

export const LEASE_LOCK = 'blocksnap'
export const DEFAULT_LEASE_SECONDS = 15
/** How long a fenced client stays blocklisted: long enough for any stall a host comes back from. */
export const FENCE_SECONDS = 7 * 24 * 3600
const HEARTBEAT_PREFIX = 'blocksnap.heartbeat.'
/** Contenders that keep finding a new holder give up after this many rounds. */
const MAX_ROUNDS = 5

export function leaseObjectOf(origin: RbdAddress): string {
  return `blocksnap.lease.${origin.image}`
}

/** What an owner publishes beside its lock. */
export interface Heartbeat {
  readonly token: string
  readonly host: string
  readonly pid: number
  readonly volume: string
  readonly counter: number
  readonly leaseSeconds: number
  /** Addresses of the RADOS clients seen on the volume's images while this owner held it. */
  readonly gateways: readonly string[]
  /** Kernel boot and PID namespace of the owner: where its `pid` means something. */
  readonly pidSpace?: string
}

/**
 * This kernel boot and PID namespace. An owner recorded with the same one is a process this one
 * can see: when its PID is gone it is dead for sure (a restart after kill -9 need not wait out
 * its lease). Hostnames repeat across containers and hosts; boot ids and namespaces do not.
 */
function localPidSpace(): string | null {
  try {
    return `${readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()}/${readlinkSync('/proc/self/ns/pid')}`
  } catch {
    return null
  }
}

export interface LeaseOptions {
  /** The owner's renewal period is leaseSeconds/3; contenders wait 1.5 × leaseSeconds. */
  readonly leaseSeconds?: number
  /** Fence and take the lease even from a live owner. */
  readonly takeover?: boolean
  /** Called once when the lease turns out to be someone else's (taken over). */
  readonly onLost?: (err: SnapError) => void
  /** Progress worth a log line (waiting on a holder, fencing). */
  readonly onNotice?: (message: string) => void
  /** Where this owner's PID means something (tests stand in for other hosts); default: this kernel's. */
  readonly pidSpace?: string | null
}

function targetOf(address: RbdAddress): CephTarget {
  return { pool: address.pool, confFile: cephConfOf(address), clientId: address.clientId }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

function parseHeartbeat(text: string | null): Heartbeat | null {
  if (text === null) return null
  try {
    const hb = JSON.parse(text) as Heartbeat
    return typeof hb.counter === 'number' && typeof hb.leaseSeconds === 'number' ? hb : null
  } catch {
    return null
  }
}

function describe(hb: Heartbeat | null, locker: Locker): string {
  return hb ? `host ${hb.host} (pid ${hb.pid})` : `${locker.description || locker.name}`
}

export class VolumeLease {
  readonly token: string
  readonly leaseSeconds: number
  private readonly ops: CephOps
  private readonly object: string
  private readonly volume: string
  private readonly options: LeaseOptions
  /** The volume's RBD images now: fenced at a takeover, their watchers recorded in the heartbeat. */
  private images: () => readonly RbdAddress[]
  /** The RADOS client that took the lock (breaking it on release needs its name). */
  private lockerName: string | null = null
  private counter = 0
  private gateways: readonly string[] = []
  private timer: NodeJS.Timeout | null = null
  private lostError: SnapError | null = null
  private released = false
  private beating: Promise<void> = Promise.resolve()
  private readonly pidSpace: string | null

  private constructor(origin: RbdAddress, volume: string, images: () => readonly RbdAddress[], options: LeaseOptions) {
    this.token = randomBytes(8).toString('hex')
    this.leaseSeconds = options.leaseSeconds ?? DEFAULT_LEASE_SECONDS
    this.ops = new CephOps(targetOf(origin))
    this.object = leaseObjectOf(origin)
    this.volume = volume
    this.images = images
    this.options = options
    this.pidSpace = options.pidSpace === undefined ? localPidSpace() : options.pidSpace
  }

  /**
   * Takes the lease of the volume whose origin is `origin`; `images` gives the volume's RBD
   * images (origin and COWs). Refuses (SNAP_BUSY) while a live owner holds it, unless
   * `takeover`; fences a dead or taken-over owner first.
   */
  static async acquire(origin: RbdAddress, volume: string, images: () => readonly RbdAddress[], options: LeaseOptions = {}): Promise<VolumeLease> {
    const leaseSeconds = options.leaseSeconds ?? DEFAULT_LEASE_SECONDS
    if (!Number.isFinite(leaseSeconds) || leaseSeconds < 1 || leaseSeconds > 3600) {
      throw new SnapError('SNAP_BAD_ARGUMENT', `lease of ${leaseSeconds} s: give 1 to 3600 seconds`)
    }
    const lease = new VolumeLease(origin, volume, images, options)
    await lease.take()
    return lease
  }

  /** Replaces the function giving the volume's images (the Volume's manifest, once it exists). */
  trackImages(images: () => readonly RbdAddress[]): void {
    this.images = images
  }

  private get description(): string {
    return `host ${hostname()} pid ${process.pid} volume ${this.volume}`
  }

  private async take(): Promise<void> {
    for (let round = 0; round < MAX_ROUNDS; round++) {
      if (await this.ops.lockGet(this.object, LEASE_LOCK, this.token, this.description)) {
        await this.won()
        return
      }
      const holder = (await this.ops.lockInfo(this.object, LEASE_LOCK))[0]
      if (!holder) continue // released meanwhile: try again
      const hb = await this.readHeartbeat(holder.cookie)
      if (this.options.takeover !== true && hb !== null && this.pidSpace !== null && hb.pidSpace === this.pidSpace && !processExists(hb.pid)) {
        this.options.onNotice?.(`the owner of ${this.volume}, ${describe(hb, holder)}, is gone from this host: fencing it and taking the lease`)
      } else if (this.options.takeover !== true) {
        const verdict = await this.watch(holder, hb)
        if (verdict === 'changed') continue
        if (verdict === 'live') {
          const latest = (await this.readHeartbeat(holder.cookie)) ?? hb
          throw new SnapError(
            'SNAP_BUSY',
            `volume ${this.volume} is served by ${describe(latest, holder)}, whose lease on ${this.ops.target.pool}/${this.object} is alive: stop it there, or take the volume over with \`serve --takeover\` (which fences it)`,
            { details: { path: this.volume } },
          )
        }
        this.options.onNotice?.(`the owner of ${this.volume}, ${describe(hb, holder)}, renewed nothing for ${1.5 * (hb?.leaseSeconds ?? this.leaseSeconds)} s: fencing it and taking the lease`)
      } else {
        this.options.onNotice?.(`taking ${this.volume} over from ${describe(hb, holder)}: fencing it first`)
      }
      await this.fence(hb)
      await this.ops.lockBreak(this.object, LEASE_LOCK, holder)
      if (hb) await this.ops.removeXattr(this.object, HEARTBEAT_PREFIX + hb.token)
    }
    throw new SnapError('SNAP_BUSY', `volume ${this.volume}: the lease on ${this.ops.target.pool}/${this.object} kept changing hands; try again`, { details: { path: this.volume } })
  }

  /**
   * Watches `holder`'s heartbeat for 1.5 × its lease period: 'live' when the counter moves,
   * 'changed' when the lock passes to someone else meanwhile, 'dead' when nothing moves.
   */
  private async watch(holder: Locker, first: Heartbeat | null): Promise<'live' | 'dead' | 'changed'> {
    const periodSeconds = first?.leaseSeconds ?? this.leaseSeconds
    const waitMs = 1500 * periodSeconds
    const pollMs = Math.min(1000, (1000 * periodSeconds) / 6)
    this.options.onNotice?.(`${this.volume} is leased by ${describe(first, holder)}: watching its heartbeat for up to ${waitMs / 1000} s`)
    const start = performance.now()
    while (performance.now() - start < waitMs) {
      await sleep(pollMs)
      const now = (await this.ops.lockInfo(this.object, LEASE_LOCK))[0]
      if (!now || now.cookie !== holder.cookie) return 'changed'
      const hb = await this.readHeartbeat(holder.cookie)
      if (hb !== null && hb.counter !== first?.counter) return 'live'
    }
    return 'dead'
  }

  /**
   * Blocklists every client watching one of the volume's images and every address the old
   * heartbeat recorded, and returns once the monitors list them all.
   */
  private async fence(hb: Heartbeat | null): Promise<void> {
    const byCluster = new Map<string, { ops: CephOps; addresses: Set<string> }>()
    const clusterOf = (target: CephTarget) => {
      const key = `${target.confFile}\0${target.clientId ?? ''}`
      let entry = byCluster.get(key)
      if (!entry) {
        entry = { ops: key === `${this.ops.target.confFile}\0${this.ops.target.clientId ?? ''}` ? this.ops : new CephOps(target), addresses: new Set() }
        byCluster.set(key, entry)
      }
      return entry
    }
    const home = clusterOf(this.ops.target)
    for (const address of hb?.gateways ?? []) home.addresses.add(address)
    for (const image of this.images()) {
      const cluster = clusterOf(targetOf(image))
      const watchers = await cluster.ops.imageWatchers(image.image).catch((err: unknown) => {
        // A COW image removed out of band has nobody to fence.
        if (isSnapError(err, 'SNAP_NOT_FOUND')) return []
        throw err
      })
      for (const w of watchers) cluster.addresses.add(w)
    }
    for (const { ops, addresses } of byCluster.values()) {
      if (addresses.size === 0) continue
      this.options.onNotice?.(`fencing ${[...addresses].join(', ')} (OSD blocklist, ${FENCE_SECONDS} s)`)
      for (const address of addresses) await ops.blocklistAdd(address, FENCE_SECONDS)
      const listed = await ops.blocklist()
      const missing = [...addresses].filter((a) => !listed.has(a))
      if (missing.length > 0) throw new SnapError('SNAP_IO', `fencing the old owner of ${this.volume} failed: ${missing.join(', ')} not on the OSD blocklist`)
    }
  }

  private async readHeartbeat(token: string): Promise<Heartbeat | null> {
    return parseHeartbeat(await this.ops.getXattr(this.object, HEARTBEAT_PREFIX + token))
  }

  private async won(): Promise<void> {
    const me = (await this.ops.lockInfo(this.object, LEASE_LOCK)).find((l) => l.cookie === this.token)
    if (!me) throw new SnapError('SNAP_BUSY', `volume ${this.volume}: the lease on ${this.ops.target.pool}/${this.object} was broken as it was taken; try again`)
    this.lockerName = me.name
    // Records of earlier owners: nobody judges them any more.
    for (const name of await this.ops.listXattrs(this.object)) {
      if (name.startsWith(HEARTBEAT_PREFIX) && name !== HEARTBEAT_PREFIX + this.token) await this.ops.removeXattr(this.object, name)
    }
    await this.writeHeartbeat()
    this.schedule()
  }

  private heartbeat(): Heartbeat {
    return {
      token: this.token,
      host: hostname(),
      pid: process.pid,
      volume: this.volume,
      counter: this.counter,
      leaseSeconds: this.leaseSeconds,
      gateways: this.gateways,
      ...(this.pidSpace === null ? {} : { pidSpace: this.pidSpace }),
    }
  }

  private async writeHeartbeat(): Promise<void> {
    await this.ops.setXattr(this.object, HEARTBEAT_PREFIX + this.token, JSON.stringify(this.heartbeat()))
  }

  private schedule(): void {
    if (this.released || this.lostError) return
    this.timer = setTimeout(() => {
      this.timer = null
      this.beating = this.beat().finally(() => this.schedule())
    }, (1000 * this.leaseSeconds) / 3)
    // The lease never keeps a process alive on its own: the owner releases it when done.
    this.timer.unref()
  }

  /** One renewal: still ours? then the counter moves on (and, every third beat, the gateways). */
  private async beat(): Promise<void> {
    try {
      if (!(await this.stillOurs())) return
      this.counter++
      if (this.counter % 3 === 1) this.gateways = await this.watchersOfImages()
      if (this.released || this.lostError) return
      await this.writeHeartbeat()
    } catch (err) {
      // A renewal that fails is retried at the next beat. Safety does not rest on it: a holder
      // whose heartbeat stops is fenced before anyone else takes the lease.
      this.options.onNotice?.(`renewing the lease of ${this.volume}: ${(err as Error).message}`)
    }
  }

  private async watchersOfImages(): Promise<string[]> {
    const found = new Set<string>()
    for (const image of this.images()) {
      const ops = image.pool === this.ops.target.pool && cephConfOf(image) === this.ops.target.confFile ? this.ops : new CephOps(targetOf(image))
      for (const w of await ops.imageWatchers(image.image).catch(() => [])) found.add(w)
    }
    return [...found].sort()
  }

  /** Reads the lock: false (and the lease lost) when it no longer carries this owner's token. */
  private async stillOurs(): Promise<boolean> {
    if (this.lostError) return false
    const holders = await this.ops.lockInfo(this.object, LEASE_LOCK)
    if (this.lostError || this.released) return false
    if (holders.some((l) => l.cookie === this.token)) return true
    const holder = holders[0]
    const hb = holder ? await this.readHeartbeat(holder.cookie).catch(() => null) : null
    const by = holder ? `taken over by ${describe(hb, holder)}` : 'broken'
    this.lose(new SnapError('SNAP_BUSY', `volume ${this.volume}: lost its lease on ${this.ops.target.pool}/${this.object} (${by}); this process was fenced and must stop serving it`, { details: { path: this.volume } }))
    return false
  }

  private lose(err: SnapError): void {
    if (this.lostError) return
    this.lostError = err
    if (this.timer) clearTimeout(this.timer)
    this.timer = null
    this.options.onLost?.(err)
  }

  /** True while this process has not seen the lease taken from it. */
  get held(): boolean {
    return this.lostError === null && !this.released
  }

  /** Throws (SNAP_BUSY) unless the lock still carries this owner's token: before every manifest write. */
  async assertHeld(): Promise<void> {
    if (this.released) throw new SnapError('SNAP_CLOSED', `the lease of volume ${this.volume} was released`)
    if (!this.lostError) await this.stillOurs()
    if (this.lostError) throw this.lostError
  }

  /** Gives the lease up (the lock, then the heartbeat); nothing when it was lost meanwhile. */
  async release(): Promise<void> {
    if (this.released) return
    this.released = true
    if (this.timer) clearTimeout(this.timer)
    this.timer = null
    await this.beating.catch(() => {})
    if (this.lostError || this.lockerName === null) return
    await this.ops.lockBreak(this.object, LEASE_LOCK, { name: this.lockerName, cookie: this.token }).catch(() => {})
    await this.ops.removeXattr(this.object, HEARTBEAT_PREFIX + this.token).catch(() => {})
  }
}
