/**
 * What happens to a volume, as structured events: the Volume emits them (it subscribes to its
 * origin, snapshots and merges), `serve` logs each as a pino record with these fields and hands
 * it to the --on-event hook, and offline commands print the warnings on stderr.
 *
 * Every event names its volume; byte counts and percentages carry their unit in the name. The
 * field set of each type is part of the hook's contract (README "Events").
 */

export interface SnapshotInvalidatedEvent {
  readonly type: 'snapshot-invalidated'
  readonly volume: string
  readonly snapshot: string
  /** 'COW full' or 'COW I/O error'. */
  readonly reason: string
  readonly cowPath: string
}

export interface SnapshotNoSpaceEvent {
  readonly type: 'snapshot-no-space'
  readonly volume: string
  readonly snapshot: string
  readonly cowPath: string
  readonly reason: string
}

export interface SnapshotSpaceRestoredEvent {
  readonly type: 'snapshot-space-restored'
  readonly volume: string
  readonly snapshot: string
  readonly cowPath: string
}

export interface FillThresholdEvent {
  readonly type: 'fill-threshold'
  readonly volume: string
  readonly snapshot: string
  /** The warning level crossed (--warn-at, then every 5 % up to 95). */
  readonly thresholdPercent: number
  /** The fill now: allocated against capacity, two decimals. */
  readonly percent: number
  readonly allocatedBytes: number
  /** The COW file's size now. */
  readonly cowBytes: number
  /** What the fill is measured against: cowBytes for a fixed-size COW, plus free space for a grow-on-demand one. */
  readonly capacityBytes: number
}

export interface CowExtendedEvent {
  readonly type: 'cow-extended'
  readonly volume: string
  readonly snapshot: string
  readonly fromBytes: number
  readonly toBytes: number
  /** The fill after the extension. */
  readonly percent: number
  readonly allocatedBytes: number
}

export interface CowExtendFailedEvent {
  readonly type: 'cow-extend-failed'
  readonly volume: string
  readonly snapshot: string
  readonly fromBytes: number
  readonly toBytes: number
  readonly reason: string
}

export interface MergeStartedEvent {
  readonly type: 'merge-started'
  readonly volume: string
  readonly snapshot: string
  readonly totalBytes: number
  /** null: no limit. */
  readonly rateBytesPerSecond: number | null
}

export interface MergeProgressEvent {
  readonly type: 'merge-progress'
  readonly volume: string
  readonly snapshot: string
  /** Whole tens: 10, 20, … 90 (one event per ten percent merged). */
  readonly percent: number
  readonly doneBytes: number
  readonly totalBytes: number
  readonly rateBytesPerSecond: number
  readonly etaSeconds: number | null
}

export interface MergeDoneEvent {
  readonly type: 'merge-done'
  readonly volume: string
  readonly snapshot: string
  readonly totalBytes: number
}

export interface MergeFailedEvent {
  readonly type: 'merge-failed'
  readonly volume: string
  readonly snapshot: string
  readonly code: string
  readonly reason: string
}

export interface WriteBackFailedEvent {
  readonly type: 'write-back-failed'
  readonly volume: string
  readonly offsetBytes: number
  readonly lengthBytes: number
  readonly code: string
  readonly reason: string
}

export type VolumeEvent =
  | SnapshotInvalidatedEvent
  | SnapshotNoSpaceEvent
  | SnapshotSpaceRestoredEvent
  | FillThresholdEvent
  | CowExtendedEvent
  | CowExtendFailedEvent
  | MergeStartedEvent
  | MergeProgressEvent
  | MergeDoneEvent
  | MergeFailedEvent
  | WriteBackFailedEvent

export type EventLevel = 'info' | 'warn' | 'error'

export function volumeEventLevel(event: VolumeEvent): EventLevel {
  switch (event.type) {
    case 'snapshot-invalidated':
    case 'snapshot-no-space':
    case 'fill-threshold':
    case 'cow-extend-failed':
      return 'warn'
    case 'merge-failed':
    case 'write-back-failed':
      return 'error'
    default:
      return 'info'
  }
}

/** One line saying what happened, naming volume and snapshot (the log record's message). */
export function describeVolumeEvent(e: VolumeEvent): string {
  switch (e.type) {
    case 'snapshot-invalidated':
      return `volume ${e.volume}, snapshot ${e.snapshot} is now invalid: ${e.reason} (${e.cowPath})`
    case 'snapshot-no-space':
      return (
        `volume ${e.volume}, snapshot ${e.snapshot}: no space on the file system holding ${e.cowPath}; ` +
        `origin writes that need a copy into it fail with ENOSPC until space is freed, the snapshot stays valid (${e.reason})`
      )
    case 'snapshot-space-restored':
      return `volume ${e.volume}, snapshot ${e.snapshot}: copies into ${e.cowPath} succeed again`
    case 'fill-threshold':
      return `snapshot ${e.volume}@${e.snapshot} is ${e.percent.toFixed(2)}% full (warning at ${e.thresholdPercent}%): ${e.allocatedBytes} of ${e.capacityBytes} bytes`
    case 'cow-extended':
      return `snapshot ${e.volume}@${e.snapshot}: COW extended from ${e.fromBytes} to ${e.toBytes} bytes; now ${e.percent.toFixed(2)}% full`
    case 'cow-extend-failed':
      return `snapshot ${e.volume}@${e.snapshot}: COW not extended from ${e.fromBytes} to ${e.toBytes} bytes: ${e.reason}; it is invalidated when it fills up`
    case 'merge-started':
      return `${e.volume}: merge of ${e.snapshot} started (${e.totalBytes} bytes${e.rateBytesPerSecond === null ? '' : ` at ${e.rateBytesPerSecond} bytes/s`})`
    case 'merge-progress':
      return `${e.volume}: merge of ${e.snapshot} ${e.percent}% done (${e.doneBytes} of ${e.totalBytes} bytes)`
    case 'merge-done':
      return `${e.volume}: merge of ${e.snapshot} complete`
    case 'merge-failed':
      return `${e.volume}: merge of ${e.snapshot} failed: ${e.reason}`
    case 'write-back-failed':
      return `${e.volume}: write-back of ${e.lengthBytes} bytes at ${e.offsetBytes} failed: ${e.reason}; the next flush reports it`
  }
}

/** part / whole in percent with two decimals, never above 100. */
export function fillPercent(part: number, whole: number): number {
  if (whole <= 0) return 0
  return Math.min(100, Math.round((10000 * part) / whole) / 100)
}
