/**
 * FillWatch: one snapshot's fill warnings and autoextend, as dmeventd does them for LVM.
 *
 * - Warnings: at --warn-at, then at every multiple of 5 above it up to 95 (80, 85, 90, 95 by
 *   default). A level is reported once per upward crossing: one event per check, naming the
 *   highest level reached, so a burst from 70 % to 92 % reports 90 once. After an extension
 *   the fill drops, and crossing a level again reports it again.
 * - Autoextend (LVM's snapshot_autoextend_threshold/_percent): once the fill of a fixed-size
 *   COW reaches the threshold, the COW grows by `percent` of its size, as often as needed to
 *   bring the fill below the threshold, in whole chunks. While an extension is in flight, a copy
 *   that finds the COW full waits for it (Snapshot's CowFullHandler) instead of invalidating.
 *   An extension the file system has no room for is reported and not tried again while the
 *   volume is open: the COW then fills up and is invalidated, as the kernel does.
 * - The check runs on the snapshot's 'threshold' event (at commits, armed at the next level),
 *   never per request.
 */
import type { Snapshot } from '../snapshot/snapshot.js'
import { SECTOR_BYTES } from '../units.js'
import { type VolumeEvent, fillPercent } from './volume-events.js'

/** The warning levels dmeventd repeats at after the first. */
const LEVEL_STEP_PERCENT = 5
const TOP_LEVEL_PERCENT = 95

export interface AutoextendPolicy {
  readonly thresholdPercent: number
  readonly percent: number
}

export interface FillPolicy {
  /** null: no warnings. */
  readonly warnAtPercent: number | null
  /** null: the COW keeps its size (kernel behaviour). */
  readonly autoextend: AutoextendPolicy | null
}

/** --warn-at, then every multiple of 5 above it up to 95. */
export function warnLevels(warnAtPercent: number): number[] {
  const levels = [warnAtPercent]
  for (let l = (Math.floor(warnAtPercent / LEVEL_STEP_PERCENT) + 1) * LEVEL_STEP_PERCENT; l <= TOP_LEVEL_PERCENT; l += LEVEL_STEP_PERCENT) levels.push(l)
  return levels
}

/**
 * The size autoextend grows a COW of `sizeBytes` holding `allocatedBytes` to: by `percent` of
 * its size (at least one chunk), repeated until the fill is below the threshold.
 */
export function autoextendTarget(sizeBytes: number, allocatedBytes: number, policy: AutoextendPolicy, chunkBytes: number): number {
  let target = sizeBytes
  do {
    const step = Math.max(chunkBytes, Math.ceil((target * policy.percent) / 100 / chunkBytes) * chunkBytes)
    target += step
  } while (allocatedBytes * 100 >= policy.thresholdPercent * target && Number.isSafeInteger(target))
  return target
}

/** What a FillWatch needs from the volume that owns the snapshot. */
export interface FillWatchHost {
  readonly volume: string
  /** Fixed-size COW (else grow-on-demand: the fill counts the file system's free space too). */
  readonly fixed: boolean
  /** Free bytes of the file system holding the COW. */
  freeBytes(): Promise<number>
  emit(event: VolumeEvent): void
  /** Grows the COW to `toBytes` if the file system has room for it; rejects with the reason otherwise. */
  grow(toBytes: number): Promise<void>
  /** Records the new size (manifest); runs after the cow-extended event. */
  recordSize(toBytes: number): Promise<void>
}

interface Reading {
  readonly allocatedBytes: number
  readonly cowBytes: number
  readonly capacityBytes: number
}

export class FillWatch {
  private readonly snap: Snapshot
  private readonly policy: FillPolicy
  private readonly host: FillWatchHost
  private readonly levels: readonly number[]
  /** Highest level reported in the current upward run; null: none. */
  private warned: number | null = null
  /** Free space of a grow-on-demand COW's file system, as last measured. */
  private freeBytes = 0
  private extension: Promise<void> | null = null
  private extendFailed = false
  /** Work the volume must wait for before it closes (an extension and its record). */
  private work: Promise<void> = Promise.resolve()
  private readonly onThreshold = (): void => this.thresholdReached()

  constructor(snap: Snapshot, policy: FillPolicy, host: FillWatchHost) {
    this.snap = snap
    this.policy = policy
    this.host = host
    this.levels = policy.warnAtPercent === null ? [] : warnLevels(policy.warnAtPercent)
  }

  /** Arms the snapshot at the levels above its fill now, without reporting what is already crossed. */
  async start(): Promise<void> {
    if (this.levels.length === 0 && this.policy.autoextend === null) return
    if (!this.host.fixed) this.freeBytes = await this.host.freeBytes()
    this.warned = this.highestLevel(this.reading())
    this.snap.emitter.on('threshold', this.onThreshold)
    if (this.policy.autoextend !== null) this.snap.setCowFullHandler(() => this.extendWhenFull())
    this.arm()
  }

  stop(): void {
    this.snap.emitter.off('threshold', this.onThreshold)
    this.snap.setCowFullHandler(null)
    this.snap.setUsageThreshold(null)
  }

  /** Settles once any extension in flight and its manifest record are done. */
  settled(): Promise<void> {
    return this.work
  }

  /** Reports the level the fill is at now, if any (serve, at start). */
  reportNow(): void {
    if (this.warned === null || this.snap.state !== 'active') return
    this.host.emit(this.fillEvent(this.warned, this.reading()))
  }

  private reading(): Reading {
    const usage = this.snap.usage()
    const cowBytes = usage.totalSectors * SECTOR_BYTES
    return {
      allocatedBytes: usage.allocatedSectors * SECTOR_BYTES,
      cowBytes,
      capacityBytes: this.host.fixed ? cowBytes : cowBytes + this.freeBytes,
    }
  }

  private highestLevel(r: Reading): number | null {
    let highest: number | null = null
    for (const level of this.levels) if (reached(r, level)) highest = level
    return highest
  }

  private thresholdReached(): void {
    if (this.host.fixed) return this.check()
    // The free space moves with everything else on the file system: measured again when it matters.
    const measured = this.host.freeBytes().then((free) => {
      this.freeBytes = free
      this.check()
    })
    this.track(measured)
  }

  private check(): void {
    // Invalid, overflowed (PO: full, and its writes say so) or merging: nothing left to warn about.
    if (this.snap.state !== 'active') return
    const r = this.reading()
    const auto = this.policy.autoextend
    // Autoextend brings the fill down: no warning while it is under way.
    if (this.extension === null && auto !== null && !this.extendFailed && reached(r, auto.thresholdPercent)) this.startExtension(r)
    if (this.extension !== null) return this.arm()
    const level = this.highestLevel(r)
    if (level !== null && (this.warned === null || level > this.warned)) {
      this.warned = level
      this.host.emit(this.fillEvent(level, r))
    }
    this.arm()
  }

  private fillEvent(level: number, r: Reading): VolumeEvent {
    return {
      type: 'fill-threshold',
      volume: this.host.volume,
      snapshot: this.snap.snapshotName,
      thresholdPercent: level,
      percent: fillPercent(r.allocatedBytes, r.capacityBytes),
      allocatedBytes: r.allocatedBytes,
      cowBytes: r.cowBytes,
      capacityBytes: r.capacityBytes,
    }
  }

  /** The snapshot's CowFullHandler: the extension to wait for, started now if need be. */
  private extendWhenFull(): Promise<void> | null {
    if (this.extension === null && this.snap.valid) this.startExtension(this.reading())
    return this.extension
  }

  private startExtension(r: Reading): void {
    const auto = this.policy.autoextend
    if (auto === null || this.extension !== null || this.extendFailed) return
    const fromBytes = r.cowBytes
    const toBytes = autoextendTarget(fromBytes, r.allocatedBytes, auto, this.snap.chunkBytes)
    const growing = this.host.grow(toBytes)
    this.extension = growing
    // Registered before any copy waits on `growing`, so this runs first: the fill and the
    // armed threshold are up to date when the waiting copies retry.
    const recorded = growing.then(
      () => {
        this.extension = null
        const after = this.reading()
        this.warned = this.highestLevel(after)
        this.host.emit({
          type: 'cow-extended',
          volume: this.host.volume,
          snapshot: this.snap.snapshotName,
          fromBytes,
          toBytes,
          percent: fillPercent(after.allocatedBytes, after.capacityBytes),
          allocatedBytes: after.allocatedBytes,
        })
        this.arm()
        return this.host.recordSize(toBytes)
      },
      (err: unknown) => {
        this.extension = null
        this.extendFailed = true
        const reason = err instanceof Error ? err.message : String(err)
        this.host.emit({ type: 'cow-extend-failed', volume: this.host.volume, snapshot: this.snap.snapshotName, fromBytes, toBytes, reason })
        // The warnings take over from here (the levels the fill is already past included).
        this.check()
      },
    )
    this.track(recorded)
  }

  private track(job: Promise<void>): void {
    const previous = this.work
    this.work = Promise.all([previous, job.catch(() => {})]).then(() => {})
  }

  /** Arms the snapshot at the next level to check: the next warning, or the autoextend threshold. */
  private arm(): void {
    const r = this.reading()
    let next: number | null = null
    for (const level of this.levels) {
      if (this.warned !== null && level <= this.warned) continue
      next = level
      break
    }
    const auto = this.policy.autoextend
    if (auto !== null && !this.extendFailed && this.extension === null && (next === null || auto.thresholdPercent < next)) next = auto.thresholdPercent
    this.snap.setUsageThreshold(next === null ? null : Math.ceil((next * r.capacityBytes) / 100))
  }
}

/** Whether the fill has reached `level` percent (exact, in integers). */
function reached(r: Reading, level: number): boolean {
  return r.capacityBytes > 0 && r.allocatedBytes * 100 >= level * r.capacityBytes
}
