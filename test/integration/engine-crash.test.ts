/**
 * Crash consistency: origin and COW devices share one recorded timeline; the log is cut at many
 * points (unflushed writes dropped, kept at random, or torn), the volume is reopened from the
 * images, and every persistent view must equal its content at the last completed sync point,
 * except bytes written after that point, which may hold any of those later values. A snapshot
 * that reads data the origin got after the snapshot was taken is "silently wrong" and fails.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import type { BlockDevice } from '../../src/device/block-device.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import type { Snapshot } from '../../src/snapshot/snapshot.js'
import { CrashRecorder } from '../support/crash-recorder.js'
import { FaultyDevice } from '../support/faulty-device.js'
import { Random, streamSeed } from '../support/random.js'
import { Scheduler } from '../support/scheduler.js'
import { type SnapshotSpec, makeSnapshot } from '../support/engine-stack.js'

const ORIGIN_BYTES = 96 * 1024 + 512
const SPECS: SnapshotSpec[] = [
  { name: 'p512', kind: 'P', chunkBytes: 512, cowBytes: 2 * 1024 * 1024 },
  { name: 'p4k', kind: 'P', chunkBytes: 4096, cowBytes: 2 * 1024 * 1024 },
  { name: 'po64k', kind: 'PO', chunkBytes: 65536, cowBytes: 2 * 1024 * 1024 },
  { name: 'n4k', kind: 'N', chunkBytes: 4096, cowBytes: 2 * 1024 * 1024 },
]

interface ViewModel {
  sync: Uint8Array // content at the last sync point
  current: Uint8Array
  since: Array<{ start: number; data: Uint8Array }> // writes issued after the sync point
}

interface SyncPoint {
  eventIndex: number
  views: Map<string, { sync: Uint8Array; since: Array<{ start: number; data: Uint8Array }> }>
}

/** Completes in the order `scheduler` picks (the recorder logs in application order). */
function delayed(dev: BlockDevice, scheduler: Scheduler, name: string): FaultyDevice {
  const f = new FaultyDevice(dev, name)
  f.setGate(scheduler)
  return f
}

async function recordTrace(seed: number) {
  const random = new Random(streamSeed(seed, 'operations'))
  const scheduler = new Scheduler(seed, { slowReadChance: 0 })
  const recorder = new CrashRecorder()
  const originBase = MemoryDevice.fromBytes(random.bytes(ORIGIN_BYTES))
  const origin = new Origin(delayed(recorder.device('origin', originBase), scheduler, 'origin'), { events: new ExceptionEvents() })
  const snaps = new Map<string, Snapshot>()
  const cowBases = new Map<string, MemoryDevice>()
  const models = new Map<string, ViewModel>()
  const originContent = originBase.readSync(0, ORIGIN_BYTES)
  models.set('origin', { sync: originContent.slice(), current: originContent.slice(), since: [] })
  for (const spec of SPECS) {
    const base = new MemoryDevice(spec.cowBytes)
    cowBases.set(spec.name, base)
    const snap = makeSnapshot(spec, delayed(recorder.device(spec.name, base), scheduler, spec.name))
    await origin.addSnapshot(snap)
    snaps.set(spec.name, snap)
    const current = (models.get('origin') as ViewModel).current
    models.set(spec.name, { sync: current.slice(), current: current.slice(), since: [] })
  }
  const syncPoints: SyncPoint[] = []
  const sync = async () => {
    await origin.flush()
    for (const s of snaps.values()) await s.flush()
    for (const m of models.values()) {
      m.sync = m.current.slice()
      m.since = []
    }
    syncPoints.push({
      eventIndex: recorder.length,
      views: new Map([...models].map(([k, m]) => [k, { sync: m.sync, since: m.since }])),
    })
  }
  await sync()
  for (let step = 0; step < 30; step++) {
    const batch: Array<Promise<void>> = []
    const names = ['origin', 'origin', ...snaps.keys()]
    const claimed: Array<[string, number, number]> = []
    for (let i = 0; i < 6; i++) {
      const view = random.pick(names)
      const length = 1 + random.int(random.chance(0.5) ? 600 : 20000)
      const start = random.int(ORIGIN_BYTES - length + 1)
      if (claimed.some(([v, s, e]) => v === view && s < start + length && start < e)) continue
      claimed.push([view, start, start + length])
      const data = random.bytes(length)
      const m = models.get(view) as ViewModel
      m.current.set(data, start)
      m.since.push({ start, data })
      const dev: BlockDevice = view === 'origin' ? origin : (snaps.get(view) as Snapshot)
      batch.push(dev.write(data, start, { fua: random.chance(0.1) }))
    }
    await Promise.all(batch)
    if (random.chance(0.25)) await sync()
  }
  for (const s of snaps.values()) assert.ok(s.valid, `seed ${seed}: ${s.snapshotName} invalid before the crash`)
  await origin.close()
  return { recorder, syncPoints }
}

function checkView(actual: Uint8Array, expected: { sync: Uint8Array; since: Array<{ start: number; data: Uint8Array }> }, what: string): void {
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] === expected.sync[i]) continue
    const explained = expected.since.some((w) => i >= w.start && i < w.start + w.data.length && w.data[i - w.start] === actual[i])
    if (!explained) assert.fail(`${what}: byte ${i} is neither its synced value nor a later write`)
  }
}

async function checkCut(recorder: CrashRecorder, syncPoints: SyncPoint[], cut: number, options: Parameters<CrashRecorder['imagesAt']>[1], what: string) {
  const images = recorder.imagesAt(cut, options)
  let point = syncPoints[0] as SyncPoint
  for (const p of syncPoints) if (p.eventIndex <= cut) point = p
  const origin = new Origin(images.get('origin') as MemoryDevice, { events: new ExceptionEvents() })
  checkView(await origin.read(0, ORIGIN_BYTES), point.views.get('origin') as SyncPoint['views'] extends Map<string, infer V> ? V : never, `${what} origin`)
  for (const spec of SPECS) {
    if (spec.kind === 'N') continue // transient snapshots do not survive a restart
    const snap = makeSnapshot(spec, images.get(spec.name) as MemoryDevice)
    await origin.addSnapshot(snap)
    assert.ok(snap.valid, `${what}: ${spec.name} came back invalid`)
    const expected = point.views.get(spec.name)
    assert.ok(expected)
    checkView(await snap.read(0, ORIGIN_BYTES), expected, `${what} ${spec.name}`)
  }
  await origin.close()
}

test('engine crash: every cut of the write log reopens to a consistent state', async () => {
  let cuts = 0
  for (const seed of [101, 202, 303]) {
    const { recorder, syncPoints } = await recordTrace(seed)
    const random = new Random(seed)
    const total = recorder.length
    const chosen = new Set<number>([0, total])
    for (const f of recorder.flushIndices()) {
      chosen.add(f)
      chosen.add(f + 1)
    }
    while (chosen.size < 120 && chosen.size < total) chosen.add(random.int(total + 1))
    for (const cut of [...chosen].sort((a, b) => a - b)) {
      await checkCut(recorder, syncPoints, cut, { unflushed: 'drop' }, `seed ${seed} cut ${cut} drop`)
      await checkCut(recorder, syncPoints, cut, { unflushed: 'random', seed: cut, tear: true }, `seed ${seed} cut ${cut} random+tear`)
      cuts += 2
    }
  }
  assert.ok(cuts >= 400, `only ${cuts} cut points`)
  console.log(`# engine crash: ${cuts} cut points checked`)
})
