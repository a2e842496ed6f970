/**
 * Merge power-cut cases, shared by test/merge/merge-crash.test.ts and the torture campaign
 * (reference §8.8, invariant 48). A merge of a persistent snapshot 'm' runs on devices recorded
 * by one CrashRecorder (origin and every COW, completing in the order a seeded Scheduler picks),
 * with other persistent snapshots of mixed chunk sizes. For each cut point the disks are rebuilt
 * as a power failure could leave them, the origin and its snapshots are reopened, the merge is
 * started again, and then:
 * - the origin equals the merged snapshot's view at merge start (= an uninterrupted merge);
 * - every other snapshot still shows its own content (relocation was durable in time).
 */
import assert from 'node:assert/strict'
import type { BlockDevice } from '../../src/device/block-device.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { startMerge } from '../../src/merge/merge.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import type { Snapshot } from '../../src/snapshot/snapshot.js'
import { assertSameBytes } from '../merge/merge-support.js'
import { CrashRecorder } from './crash-recorder.js'
import { type SnapshotSpec, addSnapshot, makeSnapshot, newStack } from './engine-stack.js'
import { FaultyDevice } from './faulty-device.js'
import { Random } from './random.js'
import { Scheduler } from './scheduler.js'

const KiB = 1024

export interface CrashCase {
  readonly seed: number
  readonly originBytes: number
  readonly specs: readonly SnapshotSpec[]
  /** Origin writes (4 KiB each, random order) after the merged snapshot is taken. */
  readonly originWrites: number
  /** Every n-th cut point is replayed (1: all). */
  readonly cutStride: number
  /** Passed to startMerge; absent: the default step size (a whole metadata area of 4 KiB chunks). */
  readonly maxStepChunks?: number
}

async function openStack(originDev: BlockDevice, cows: Map<string, BlockDevice>, specs: readonly SnapshotSpec[]): Promise<{ origin: Origin; snaps: Map<string, Snapshot> }> {
  const origin = new Origin(originDev, { events: new ExceptionEvents() })
  const snaps = new Map<string, Snapshot>()
  for (const spec of specs) {
    const snap = makeSnapshot(spec, cows.get(spec.name) as BlockDevice)
    await origin.addSnapshot(snap)
    snaps.set(spec.name, snap)
  }
  return { origin, snaps }
}

export async function recordMergeCase(c: CrashCase): Promise<MergeTrace> {
  const random = new Random(c.seed)
  const what = `seed ${c.seed}`
  // Build the pre-merge state on plain memory devices.
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(c.originBytes)), null)
  const models = new Map<string, Uint8Array>()
  for (const spec of c.specs) {
    await addSnapshot(stack, spec, null)
    if (spec.name === 'm') {
      // Scattered writes in random order: short runs, many merge steps.
      const slots = Array.from({ length: Math.floor(c.originBytes / (4 * KiB)) }, (_, i) => i)
      for (let i = slots.length - 1; i > 0; i--) {
        const j = random.int(i + 1)
        ;[slots[i], slots[j]] = [slots[j] as number, slots[i] as number]
      }
      for (const slot of slots.slice(0, c.originWrites)) await stack.origin.write(random.bytes(4 * KiB), slot * 4 * KiB)
      // The snapshot's own writes are merged too.
      const snap = stack.snapshots.get('m') as Snapshot
      for (let i = 0; i < 4; i++) await snap.write(random.bytes(3000), random.int(c.originBytes - 3000))
    } else {
      for (let i = 0; i < 3; i++) await stack.origin.write(random.bytes(5000), random.int(c.originBytes - 5000))
    }
  }
  // A partial last chunk: include the tail in the merge.
  await stack.origin.write(random.bytes(700), c.originBytes - 700)
  for (const spec of c.specs) models.set(spec.name, await (stack.snapshots.get(spec.name) as Snapshot).read(0, c.originBytes))
  const expectedOrigin = models.get('m') as Uint8Array
  // Clone before closing: closing a MemoryDevice frees its pages.
  await stack.origin.flush()
  for (const snap of stack.snapshots.values()) await snap.flush()
  const originImage = stack.originBase.clone({ readOnly: false })
  const cowImages = new Map([...stack.cowBases].map(([name, base]) => [name, base.clone({ readOnly: false })]))
  await stack.origin.close()

  // Record the merge.
  const recorder = new CrashRecorder()
  const recOrigin = recorder.device('origin', originImage)
  const recCows = new Map<string, BlockDevice>()
  const scheduler = new Scheduler(c.seed, { slowReadChance: 0 })
  for (const spec of c.specs) recCows.set(spec.name, delayed(recorder.device(spec.name, cowImages.get(spec.name) as MemoryDevice), scheduler, spec.name))
  const live = await openStack(delayed(recOrigin, scheduler, 'origin'), recCows, c.specs)
  for (const spec of c.specs) assertSameBytes(await (live.snaps.get(spec.name) as Snapshot).read(0, c.originBytes), models.get(spec.name) as Uint8Array, `${what}: reopened ${spec.name} before merge`)
  const options: { maxStepChunks?: number } = c.maxStepChunks === undefined ? {} : { maxStepChunks: c.maxStepChunks }
  const merge = await startMerge(live.origin, live.snaps.get('m') as Snapshot, options)
  // The cuts between a step's origin copies and its commitMerge must include batches of several
  // non-consecutive runs (one flush and one metadata write for all of them).
  let mostRuns = 0
  merge.on('window', (w) => (mostRuns = Math.max(mostRuns, w.ranges.length)))
  // Readers of the other snapshots run during the merge (they create no events).
  const readers = (async () => {
    while (merge.state === 'running') {
      const name = random.pick(c.specs.filter((s) => s.name !== 'm')).name
      const start = random.int(c.originBytes - 9000)
      const got = await (live.snaps.get(name) as Snapshot).read(start, 9000)
      assertSameBytes(got, (models.get(name) as Uint8Array).subarray(start, start + 9000), `${what}: live read of ${name}`)
    }
  })()
  await merge.done
  await readers
  assertSameBytes(await live.origin.read(0, c.originBytes), expectedOrigin, `${what}: uninterrupted merge`)
  await live.origin.close()

  return { c, recorder, models, expectedOrigin, options, mostRuns }
}

export interface MergeTrace {
  readonly c: CrashCase
  readonly recorder: CrashRecorder
  /** Each snapshot's view before the merge. */
  readonly models: ReadonlyMap<string, Uint8Array>
  /** The merged snapshot's view: the origin after any complete merge. */
  readonly expectedOrigin: Uint8Array
  readonly options: { maxStepChunks?: number }
  /** Most runs one merge step copied (the cuts between a step's copies and its commit matter). */
  readonly mostRuns: number
}

/** Cut points replayed for a case: every `cutStride`-th event, and the end. */
export function mergeCuts(trace: MergeTrace): number[] {
  const total = trace.recorder.length
  const cuts: number[] = []
  for (let cut = 0; cut <= total; cut += cut === total ? 1 : Math.min(trace.c.cutStride, total - cut)) cuts.push(cut)
  return cuts
}

/**
 * Rebuilds the disks for a cut before event `cut` (unflushed writes dropped, or a random subset
 * kept with the last one torn), reopens, resumes the merge and checks the origin and the other
 * snapshots.
 */
export async function checkMergeCut(trace: MergeTrace, cut: number, mode: 'drop' | 'random'): Promise<void> {
  const { c, recorder, models, expectedOrigin, options } = trace
  const total = recorder.length
  const images = recorder.imagesAt(cut, mode === 'drop' ? {} : { unflushed: 'random', tear: true, seed: cut })
  const cows = new Map<string, BlockDevice>(c.specs.map((s) => [s.name, images.get(s.name) as MemoryDevice]))
  const at = `seed ${c.seed} cut ${cut}/${total} (${mode})`
  const reopened = await openStack(images.get('origin') as MemoryDevice, cows, c.specs)
  try {
    const m = reopened.snaps.get('m') as Snapshot
    assert.ok(m.valid, `${at}: merged snapshot reopened invalid`)
    const resumed = await startMerge(reopened.origin, m, options)
    // The origin shows the merged view at once.
    assertSameBytes(await reopened.origin.read(0, c.originBytes), expectedOrigin, `${at}: merged view after reopen`)
    await resumed.done
    assert.equal(resumed.state, 'complete', `${at}: resumed merge state`)
    assertSameBytes(await reopened.origin.read(0, c.originBytes), expectedOrigin, `${at}: origin after resumed merge`)
    for (const spec of c.specs) {
      if (spec.name === 'm') continue
      const snap = reopened.snaps.get(spec.name) as Snapshot
      assert.ok(snap.valid, `${at}: ${spec.name} invalid`)
      assertSameBytes(await snap.read(0, c.originBytes), models.get(spec.name) as Uint8Array, `${at}: snapshot ${spec.name}`)
    }
    const u = m.usage()
    assert.equal(u.allocatedSectors, u.metadataSectors, `${at}: allocated != metadata`)
  } finally {
    await reopened.origin.close()
  }
}

/** Completion order for the recorded run picked by `scheduler` (the recorder logs in application order). */
function delayed(dev: BlockDevice, scheduler: Scheduler, name: string): BlockDevice {
  const faulty = new FaultyDevice(dev, name)
  faulty.setGate(scheduler)
  return faulty
}

