/**
 * Engine power-cut traces, shared by test/integration/engine-crash.test.ts and the torture
 * campaign. An origin with snapshots of mixed chunk sizes runs on devices recorded by one
 * CrashRecorder (completing in the order a seeded Scheduler picks); random batches of
 * non-overlapping origin and snapshot writes run between sync points (flush of every view).
 * Snapshots may be added part way, and a snapshot may be given a COW too small for the trace
 * (it fills and is invalidated, as the kernel does).
 *
 * checkEngineCut() rebuilds the disks as a power cut at one point of the log could leave them and
 * reopens everything. Every persistent view must equal its content at the last sync point
 * before the cut, except bytes written after it, which may hold any of those later values; bytes
 * of a FUA write answered before the cut must be there unless a later write covers them;
 * reopening must not throw; a snapshot may come back invalid only if the run invalidated it.
 */
import assert from 'node:assert/strict'
import type { BlockDevice } from '../../src/device/block-device.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import type { Snapshot } from '../../src/snapshot/snapshot.js'
import { CrashRecorder, type ImagesAtOptions } from './crash-recorder.js'
import { type SnapshotSpec, makeSnapshot } from './engine-stack.js'
import { FaultyDevice } from './faulty-device.js'
import { Random, streamSeed } from './random.js'
import { Scheduler } from './scheduler.js'

export interface EngineTraceOptions {
  readonly seed: number
  readonly originBytes: number
  /** Snapshots taken before the first write. */
  readonly specs: readonly SnapshotSpec[]
  /** Snapshots taken between two batches, each at a random step. */
  readonly laterSpecs?: readonly SnapshotSpec[]
  readonly steps: number
  /** Origin write-back limit (absent: the Origin default). */
  readonly writeBackBytes?: number
  /** Chance that a write carries FUA. */
  readonly fuaChance?: number
  /** Chance of a sync point after a batch. */
  readonly syncChance?: number
}

interface Written {
  readonly seq: number
  readonly start: number
  readonly data: Uint8Array
}

interface ViewModel {
  sync: Uint8Array
  current: Uint8Array
  since: Written[]
  /** Writes that failed: any of their bytes may or may not have landed, forever. */
  readonly uncertain: Written[]
  /** FUA writes with the log length when they were answered. */
  readonly fua: Array<Written & { readonly answeredAt: number }>
  /** Every write, for "covered by a later write". */
  readonly all: Written[]
}

interface SyncPoint {
  readonly eventIndex: number
  readonly views: Map<string, { sync: Uint8Array; since: Written[] }>
}

export interface EngineTrace {
  readonly options: EngineTraceOptions
  readonly recorder: CrashRecorder
  readonly syncPoints: readonly SyncPoint[]
  readonly models: ReadonlyMap<string, ViewModel>
  /** Log length once each snapshot was attached (it exists for cuts at or after this). */
  readonly addedAt: ReadonlyMap<string, number>
  /** Snapshots the run invalidated (COW full). */
  readonly invalidated: ReadonlySet<string>
  readonly specs: readonly SnapshotSpec[]
}

/** Completes in the order `scheduler` picks (the recorder logs in application order). */
function delayed(dev: BlockDevice, scheduler: Scheduler, name: string): FaultyDevice {
  const f = new FaultyDevice(dev, name)
  f.setGate(scheduler)
  return f
}

export async function recordEngineTrace(options: EngineTraceOptions): Promise<EngineTrace> {
  const { seed, originBytes } = options
  const random = new Random(streamSeed(seed, 'operations'))
  const scheduler = new Scheduler(seed, { slowReadChance: 0 })
  const recorder = new CrashRecorder()
  const originBase = MemoryDevice.fromBytes(random.bytes(originBytes))
  const originOptions = options.writeBackBytes === undefined ? {} : { writeBackBytes: options.writeBackBytes }
  const origin = new Origin(delayed(recorder.device('origin', originBase), scheduler, 'origin'), { events: new ExceptionEvents(), ...originOptions })
  const snaps = new Map<string, Snapshot>()
  const models = new Map<string, ViewModel>()
  const addedAt = new Map<string, number>()
  const newModel = (content: Uint8Array): ViewModel => ({ sync: content.slice(), current: content.slice(), since: [], uncertain: [], fua: [], all: [] })
  models.set('origin', newModel(originBase.readSync(0, originBytes)))
  const syncPoints: SyncPoint[] = []
  const sync = async () => {
    await origin.flush()
    for (const s of snaps.values()) if (s.valid) await s.flush()
    for (const m of models.values()) {
      m.sync = m.current.slice()
      m.since = []
    }
    syncPoints.push({ eventIndex: recorder.length, views: new Map([...models].map(([k, m]) => [k, { sync: m.sync, since: m.since }])) })
  }
  const attach = async (spec: SnapshotSpec) => {
    const snap = makeSnapshot(spec, delayed(recorder.device(spec.name, new MemoryDevice(spec.cowBytes)), scheduler, spec.name))
    await origin.addSnapshot(snap)
    snaps.set(spec.name, snap)
    // Every answered origin write is in the new snapshot (held ones are drained first).
    models.set(spec.name, newModel((models.get('origin') as ViewModel).current))
    // The snapshot exists once it is durable: a sync point follows at once.
    await sync()
    addedAt.set(spec.name, recorder.length)
  }
  for (const spec of options.specs) await attach(spec)
  await sync()
  const later = new Map<number, SnapshotSpec[]>()
  for (const spec of options.laterSpecs ?? []) {
    const step = random.int(options.steps)
    later.set(step, [...(later.get(step) ?? []), spec])
  }
  let seq = 0
  const fuaChance = options.fuaChance ?? 0.1
  for (let step = 0; step < options.steps; step++) {
    for (const spec of later.get(step) ?? []) await attach(spec)
    const batch: Array<Promise<void>> = []
    const names = ['origin', 'origin', ...[...snaps.keys()].filter((n) => (snaps.get(n) as Snapshot).valid)]
    const claimed: Array<[string, number, number]> = []
    for (let i = 0; i < 6; i++) {
      const view = random.pick(names)
      const length = 1 + random.int(random.chance(0.5) ? 600 : 20000)
      const start = random.int(originBytes - length + 1)
      if (claimed.some(([v, s, e]) => v === view && s < start + length && start < e)) continue
      claimed.push([view, start, start + length])
      const data = random.bytes(length)
      const m = models.get(view) as ViewModel
      const written: Written = { seq: seq++, start, data }
      const before = m.current.slice(start, start + length)
      m.current.set(data, start)
      m.since.push(written)
      m.all.push(written)
      const dev: BlockDevice = view === 'origin' ? origin : (snaps.get(view) as Snapshot)
      const fua = random.chance(fuaChance)
      batch.push(
        dev.write(data, start, { fua }).then(
          () => {
            if (fua) m.fua.push({ ...written, answeredAt: recorder.length })
          },
          (err) => {
            // Only a snapshot whose COW filled may refuse writes (invalid, or PO: overflowed).
            const snap = snaps.get(view)
            if (!snap || (snap.valid && !snap.overflowed)) throw err
            // Pieces of it may have landed: from now on either value is right for its bytes.
            // (Writes of one batch to one view never overlap, so restoring its range is exact.)
            m.current.set(before, start)
            m.uncertain.push(written)
          },
        ),
      )
    }
    await Promise.all(batch)
    if (random.chance(options.syncChance ?? 0.25)) await sync()
  }
  await sync()
  const invalidated = new Set([...snaps].filter(([, s]) => !s.valid).map(([name]) => name))
  await origin.close()
  const specs = [...options.specs, ...(options.laterSpecs ?? [])]
  return { options, recorder, syncPoints, models, addedAt, invalidated, specs }
}

/** Cut points worth checking: both ends, around every flush, then random ones up to `count`. */
export function chooseCuts(trace: { recorder: CrashRecorder }, count: number, random: Random): number[] {
  const total = trace.recorder.length
  const flushes = trace.recorder.flushIndices()
  const chosen = new Set<number>([0, total])
  const aroundFlushes = flushes.flatMap((f) => [f, f + 1])
  for (let i = aroundFlushes.length - 1; i > 0; i--) {
    const j = random.int(i + 1)
    ;[aroundFlushes[i], aroundFlushes[j]] = [aroundFlushes[j] as number, aroundFlushes[i] as number]
  }
  for (const cut of aroundFlushes) {
    if (chosen.size >= Math.ceil(count / 2)) break
    chosen.add(cut)
  }
  while (chosen.size < count && chosen.size < total + 1) chosen.add(random.int(total + 1))
  return [...chosen].sort((a, b) => a - b)
}

function covered(w: Written, i: number, all: readonly Written[]): boolean {
  return all.some((x) => x.seq > w.seq && i >= x.start && i < x.start + x.data.length)
}

function checkView(actual: Uint8Array, model: ViewModel, point: { sync: Uint8Array; since: Written[] }, cut: number, what: string): void {
  const explainedBy = (list: readonly Written[], i: number) => list.some((w) => i >= w.start && i < w.start + w.data.length && w.data[i - w.start] === actual[i])
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] === point.sync[i]) continue
    if (!explainedBy(point.since, i) && !explainedBy(model.uncertain, i)) assert.fail(`${what}: byte ${i} is neither its synced value nor a later write`)
  }
  for (const w of model.fua) {
    if (w.answeredAt > cut) continue
    for (let i = w.start; i < w.start + w.data.length; i++) {
      if (actual[i] !== w.data[i - w.start] && !covered(w, i, model.all)) {
        assert.fail(`${what}: FUA write ${w.data.length}@${w.start} answered at event ${w.answeredAt} lost byte ${i}`)
      }
    }
  }
}

/** Rebuilds the disks for a cut before event `cut`, reopens them and checks every view. */
export async function checkEngineCut(trace: EngineTrace, cut: number, images: ImagesAtOptions, what: string): Promise<void> {
  const disks = trace.recorder.imagesAt(cut, images)
  let point = trace.syncPoints[0] as SyncPoint
  for (const p of trace.syncPoints) if (p.eventIndex <= cut) point = p
  const originBytes = trace.options.originBytes
  const origin = new Origin(disks.get('origin') as MemoryDevice, { events: new ExceptionEvents() })
  try {
    checkView(await origin.read(0, originBytes), trace.models.get('origin') as ViewModel, point.views.get('origin') as SyncPoint['views'] extends Map<string, infer V> ? V : never, cut, `${what} origin`)
    for (const spec of trace.specs) {
      if (spec.kind === 'N') continue // transient snapshots do not survive a restart
      const added = trace.addedAt.get(spec.name)
      if (added === undefined || added > cut) continue // not taken yet at this cut
      const snap = makeSnapshot(spec, disks.get(spec.name) as MemoryDevice)
      await origin.addSnapshot(snap)
      if (!snap.valid) {
        assert.ok(trace.invalidated.has(spec.name), `${what}: ${spec.name} came back invalid`)
        continue
      }
      const expected = point.views.get(spec.name)
      assert.ok(expected, `${what}: no model for ${spec.name}`)
      checkView(await snap.read(0, originBytes), trace.models.get(spec.name) as ViewModel, expected, cut, `${what} ${spec.name}`)
    }
  } finally {
    await origin.close()
  }
}
