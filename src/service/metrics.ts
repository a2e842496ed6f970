/**
 * Prometheus metrics of a running `serve` (prom-client, on a registry of its own so a library
 * user's global registry is left alone).
 *
 * Design notes:
 * - Volume and snapshot metrics are read, not pushed: each scrape takes one ServiceStatus and
 *   every gauge's collect() copies from it, so a scrape costs a few map lookups and a statfs per
 *   grow-on-demand COW, and the engine does no work for metrics between scrapes.
 * - NBD requests are the only pushed metrics: the server reports each answered request to
 *   `requestObserver` (one counter increment and one histogram observation). Without metrics
 *   the server has no observer and measures nothing.
 * - Series of snapshots and exports that went away disappear at the next scrape (the gauges
 *   are reset before they are filled). The copy-out counter is the snapshot's own monotonic
 *   count since the volume was opened, exposed as a counter.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'
import type { NbdOp, NbdRequestObserver } from '../nbd/request-observer.js'
import { type ServiceSources, type ServiceStatus, type SnapshotStatus, readStatus } from './status.js'

/** Request durations: NBD requests take from microseconds (page cache) to seconds (a copy-out storm). */
const DURATION_BUCKETS_SECONDS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

const SNAPSHOT_LABELS = ['volume', 'snapshot'] as const

export class ServiceMetrics {
  readonly registry = new Registry()
  /** Hand to NbdServer's `requestObserver`. */
  readonly requestObserver: NbdRequestObserver
  private readonly sources: ServiceSources
  private readonly startedAtMs: number
  /** The picture the scrape's collect() calls copy from (the latest one read). */
  private current: ServiceStatus | null = null

  constructor(sources: ServiceSources, options: { startedAtMs?: number } = {}) {
    this.sources = sources
    this.startedAtMs = options.startedAtMs ?? Date.now()
    const registers = [this.registry]
    collectDefaultMetrics({ register: this.registry })
    /** A gauge refilled from the current picture at every scrape. */
    const gauge = (name: string, help: string, labelNames: readonly string[], fill: (set: (labels: Record<string, string>, value: number) => void, status: ServiceStatus) => void) => {
      const metric: Gauge<string> = new Gauge({
        name,
        help,
        labelNames,
        registers,
        collect: () => {
          metric.reset()
          if (this.current !== null) fill((labels, value) => metric.set(labels, value), this.current)
        },
      })
    }
    const perSnapshot = (name: string, help: string, value: (s: SnapshotStatus) => number) =>
      gauge(name, help, SNAPSHOT_LABELS, (set, status) => {
        for (const v of status.volumes) for (const s of v.snapshots) set({ volume: v.name, snapshot: s.name }, value(s))
      })
    perSnapshot('blocksnap_snapshot_allocated_bytes', 'COW bytes in use (header, metadata and saved chunks), as list --json allocatedBytes', (s) => s.allocatedBytes)
    perSnapshot('blocksnap_snapshot_cow_bytes', 'Size of the COW file now (its fixed size, or what a grow-on-demand COW has grown to)', (s) => s.cowBytes)
    perSnapshot(
      'blocksnap_snapshot_capacity_bytes',
      'What the COW can hold: its size, plus the free space of its file system for a grow-on-demand COW',
      (s) => s.capacityBytes,
    )
    perSnapshot('blocksnap_snapshot_valid', '1 while the snapshot is usable, 0 once invalidated (or broken: its COW could not be opened)', (s) => (s.valid ? 1 : 0))
    const copyouts: Counter<string> = new Counter({
      name: 'blocksnap_copyout_chunks_total',
      help: 'Chunks copied out of the origin into the snapshot since the volume was opened',
      labelNames: SNAPSHOT_LABELS,
      registers,
      collect: () => {
        // The snapshot keeps the count; the counter only shows it.
        copyouts.reset()
        for (const v of this.current?.volumes ?? []) {
          for (const s of v.snapshots) copyouts.inc({ volume: v.name, snapshot: s.name }, s.copiedOutChunks)
        }
      },
    })
    gauge(
      'blocksnap_merge_remaining_bytes',
      'Bytes of the snapshot still to merge into the origin (running, paused, failed or pending merges)',
      SNAPSHOT_LABELS,
      (set, status) => {
        for (const v of status.volumes) if (v.merge !== null) set({ volume: v.name, snapshot: v.merge.snapshot }, v.merge.remainingBytes)
      },
    )
    gauge(
      'blocksnap_writeback_held_bytes',
      'Origin write bytes answered to clients and held in memory until their snapshot copies land (--write-back)',
      ['volume'],
      (set, status) => {
        for (const v of status.volumes) set({ volume: v.name }, v.heldWriteBackBytes)
      },
    )
    gauge('blocksnap_nbd_connections', 'NBD clients in transmission with the export', ['export'], (set, status) => {
      for (const e of status.exports) set({ export: e.name }, e.connections)
    })
    const requests = new Counter({
      name: 'blocksnap_nbd_requests_total',
      help: 'NBD requests answered (successfully or with an error), by export and op',
      labelNames: ['export', 'op'],
      registers,
    })
    const durations = new Histogram({
      name: 'blocksnap_nbd_request_duration_seconds',
      help: 'Time from dispatching an NBD request to queueing its reply',
      labelNames: ['export', 'op'],
      buckets: DURATION_BUCKETS_SECONDS,
      registers,
    })
    this.requestObserver = {
      requestDone(exportName: string, op: NbdOp, seconds: number): void {
        const labels = { export: exportName, op }
        requests.inc(labels)
        durations.observe(labels, seconds)
      },
    }
  }

  get contentType(): string {
    return this.registry.contentType
  }

  /** A fresh picture of the service (the status page's JSON). */
  status(): Promise<ServiceStatus> {
    return readStatus(this.sources, this.startedAtMs)
  }

  /** The Prometheus text exposition of every metric, read now. */
  async text(): Promise<string> {
    // Concurrent scrapes may read each other's picture for some metrics: both are fresh.
    this.current = await this.status()
    return this.registry.metrics()
  }
}
