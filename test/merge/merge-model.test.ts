/**
 * Randomized concurrent merge traces (issue 3): an origin with a persistent snapshot to merge
 * and at least three other snapshots (chunk sizes mixed 4 KiB–64 KiB, kinds P/PO/N), built up
 * by random concurrent I/O; then the merge runs while random readers and writers hit the origin
 * and every other snapshot, with random pauses, stops and restarts. Devices complete in an
 * order one Scheduler picks from its own stream of the seed, so a seed replays exactly. Afterwards: origin == the merged snapshot's view at merge start plus
 * the origin writes made during the merge; every other snapshot == its own model.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { isSnapError } from '../../src/errors.js'
import { type Merge, type MergeState, startMerge } from '../../src/merge/merge.js'
import { Random, streamSeed } from '../support/random.js'
import { Scheduler } from '../support/scheduler.js'
import { type SnapshotSpec, type StoreKind, addSnapshot, newStack } from '../support/engine-stack.js'
import { checkViews, randomBatch } from './merge-support.js'

const ORIGIN_BYTES = 384 * 1024 + 1536 // partial last chunk for every chunk size
const OTHER_CHUNKS = [4096, 8192, 16384, 32768, 65536]
const MERGE_CHUNKS = [4096, 16384, 65536]
const KINDS: StoreKind[] = ['P', 'PO', 'N']

export const MERGE_SEEDS = [101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112]

interface TraceResult {
  ops: number
  steps: number
  scans: number
  waits: number
  held: number
  remapped: number
  /** Most chunks a step may merge (Infinity: the default step size). */
  maxStepChunks: number
  /** The merged snapshot's exceptions when the merge started. */
  mergedChunks: number
  /** Chunks merged, summed over every step's window. */
  windowChunks: number
  /** Steps that committed while the test's I/O batches ran. */
  stepsUnderLoad: number
}

async function runTrace(seed: number, scheduler = new Scheduler(seed)): Promise<TraceResult> {
  const random = new Random(streamSeed(seed, 'operations'))
  const what = `seed ${seed}`
  const originBase = MemoryDevice.fromBytes(random.bytes(ORIGIN_BYTES))
  const stack = newStack(originBase, scheduler)
  const model = new Map<string, Uint8Array>([['origin', originBase.readSync(0, ORIGIN_BYTES)]])

  // Other snapshots: always a 4 KiB and a 64 KiB one, plus one or two more; the merged one is
  // created at a random position among them.
  const others = [4096, 65536, random.pick(OTHER_CHUNKS)]
  if (random.chance(0.5)) others.push(random.pick(OTHER_CHUNKS))
  const specs: SnapshotSpec[] = others.map((chunkBytes, i) => ({
    name: `s${i}`,
    kind: random.pick(KINDS),
    chunkBytes,
    cowBytes: 4 * 1024 * 1024,
  }))
  const mergeSpec: SnapshotSpec = { name: 'm', kind: random.pick(['P', 'PO'] as const), chunkBytes: random.pick(MERGE_CHUNKS), cowBytes: 4 * 1024 * 1024 }
  specs.splice(random.int(specs.length + 1), 0, mergeSpec)

  let ops = 0
  for (const spec of specs) {
    await addSnapshot(stack, spec, scheduler)
    model.set(spec.name, (model.get('origin') as Uint8Array).slice())
    for (let b = 0; b < 4; b++) ops += await randomBatch(stack, model, random, `${what} setup`)
  }
  // Make sure the merged snapshot differs from the origin in many places.
  for (let b = 0; b < 4; b++) ops += await randomBatch(stack, model, random, `${what} setup`, { originShare: 0.7 })

  const merging = stack.snapshots.get('m')
  assert.ok(merging)
  const mergedView = model.get('m') as Uint8Array
  model.delete('m')
  model.set('origin', mergedView.slice())
  const options = {
    // Small steps in most traces (a default step merges a whole metadata area of 4 KiB chunks),
    // so the concurrent I/O meets many step windows, each still of several runs.
    ...(random.chance(0.7) ? { maxStepChunks: 1 + random.int(6) } : {}),
  }
  let windowChunks = 0
  let stepsUnderLoad = 0
  let underLoad = true
  const watch = (m: Merge) => {
    m.on('window', (w) => (windowChunks += w.count))
    m.on('progress', () => {
      if (underLoad) stepsUnderLoad++
    })
    return m
  }
  let merge: Merge = watch(await startMerge(stack.origin, merging, options))
  // Counted once startMerge has drained the origin writes whose copies were still in flight.
  const mergedChunks = merge.progress().totalChunks
  await assert.rejects(merging.read(0, 512), (err) => isSnapError(err, 'SNAP_INVALID'), `${what}: merging snapshot's own view must fail`)
  let steps = 0
  let scans = 0
  let waits = 0
  let held = 0
  let remapped = 0
  const account = (m: Merge) => {
    steps += m.stats.steps
    scans += m.stats.relocationScans
    waits += m.stats.relocationWaits
  }

  let batches = 0
  while (merge.state !== 'complete') {
    if (merge.state === 'failed') await merge.done // rethrows the failure
    const roll = random.next()
    if (roll < 0.04 && merge.state === 'running') {
      await merge.pause()
      ops += await randomBatch(stack, model, random, `${what} paused`)
      merge.resume()
    } else if (roll < 0.07 && merge.state === 'running') {
      await merge.stop()
      const after = merge.state as MergeState
      assert.ok(after === 'stopped' || after === 'complete', `${what}: state after stop is ${after}`)
      ops += await randomBatch(stack, model, random, `${what} stopped`)
      account(merge)
      if (after === 'stopped') merge = watch(await startMerge(stack.origin, merging, options))
    } else {
      ops += await randomBatch(stack, model, random, `${what} merging`, { discards: true })
    }
    if (++batches % 10 === 0) await checkViews(stack, model, `${what} batch ${batches}`)
    if (batches > 60) break // enough concurrency; let the merge finish alone
  }
  underLoad = false
  await merge.done
  account(merge)
  held += merge.view.counters.heldWrites
  remapped += merge.view.counters.remappedWrites
  assert.equal(merge.state, 'complete', `${what}: final state`)
  assert.equal(stack.origin.interceptor, null, `${what}: interceptor still installed`)
  assert.ok(!stack.origin.snapshots.includes(merging), `${what}: merged snapshot still attached`)
  assert.equal(merging.table.size, 0, `${what}: table not empty`)
  const u = merging.usage()
  assert.equal(u.allocatedSectors, u.metadataSectors, `${what}: allocated != metadata after merge`)
  stack.snapshots.delete('m')
  await checkViews(stack, model, `${what} after merge`)
  // All I/O now goes straight to the origin (with copy-on-write into the others).
  for (let b = 0; b < 5; b++) ops += await randomBatch(stack, model, random, `${what} after merge`)
  await checkViews(stack, model, `${what} final`)
  for (const s of stack.snapshots.values()) assert.ok(s.valid, `${what}: snapshot ${s.snapshotName} became invalid`)
  await stack.origin.close()
  return { ops, steps, scans, waits, held, remapped, maxStepChunks: options.maxStepChunks ?? Infinity, mergedChunks, windowChunks, stepsUnderLoad }
}

test(`merge model: ${MERGE_SEEDS.length} randomized concurrent merge traces match the model`, async () => {
  let ops = 0
  let steps = 0
  let scans = 0
  let waits = 0
  let held = 0
  let remapped = 0
  let stepsUnderLoad = 0
  for (const seed of MERGE_SEEDS) {
    const r = await runTrace(seed)
    ops += r.ops
    steps += r.steps
    scans += r.scans
    waits += r.waits
    held += r.held
    remapped += r.remapped
    stepsUnderLoad += r.stepsUnderLoad
    // Every exception is merged by exactly one step, and no step merges more than its cap:
    // properties of the merge, whatever order the devices complete in.
    assert.equal(r.windowChunks, r.mergedChunks, `seed ${seed}: chunks merged by the steps`)
    if (Number.isFinite(r.maxStepChunks)) {
      const fewest = Math.ceil(r.mergedChunks / r.maxStepChunks)
      assert.ok(r.steps >= fewest, `seed ${seed}: ${r.steps} steps merged ${r.mergedChunks} chunks of at most ${r.maxStepChunks} each`)
    }
  }
  console.log(
    `merge model: ${MERGE_SEEDS.length} traces, ${ops} I/O operations, ${steps} merge steps (${stepsUnderLoad} under load), ${scans} relocation scans, ${waits} counter waits, ${held} held writes, ${remapped} writes remapped to the COW`,
  )
  // The device completion order is a function of the seed, so these counts are too: the
  // traces must keep exercising steps that commit while I/O runs, relocation that waits, and
  // the held and remapped write paths.
  assert.ok(stepsUnderLoad >= MERGE_SEEDS.length, `only ${stepsUnderLoad} steps committed while I/O ran`)
  assert.ok(waits > 0, 'relocation never had to wait for another snapshot')
  assert.ok(held > 0 && remapped > 0, 'the held and remapped write paths must both be exercised')
})

test('merge model: a seed replays exactly (same device completion order, same merge)', async () => {
  const run = async (seed: number) => {
    const scheduler = new Scheduler(seed, { record: true })
    const r = await runTrace(seed, scheduler)
    return { trace: scheduler.trace, stats: [r.ops, r.steps, r.scans, r.waits, r.held, r.remapped] }
  }
  const first = await run(MERGE_SEEDS[0] as number)
  const again = await run(MERGE_SEEDS[0] as number)
  assert.ok(first.trace.length > 500, `only ${first.trace.length} device completions`)
  assert.deepEqual(again.stats, first.stats, 'the replay ran a different merge')
  assert.deepEqual(again.trace, first.trace, 'the replay completed device operations in a different order')
})

/**
 * Issue 14 item 6: merges of snapshots holding nothing or one chunk, started right after the
 * snapshot is taken while I/O runs, end. The load in flight while the snapshot is taken and the
 * merge starts writes and reads only the other snapshots (an origin write racing the snapshot
 * would make its point in time, and so the model, ambiguous); origin writes, reads and discards
 * start once the merge has. Device completions are ordered by a Scheduler with its own stream, so
 * a seed replays exactly.
 */
export const SMALL_MERGE_SEEDS = [201, 202, 203, 204, 205, 206, 207, 208]

async function runSmallTrace(seed: number, exceptions: 0 | 1): Promise<number> {
  const random = new Random(seed)
  const delays = new Scheduler(seed)
  const what = `seed ${seed} (${exceptions} exception${exceptions === 1 ? '' : 's'})`
  const originBase = MemoryDevice.fromBytes(random.bytes(ORIGIN_BYTES))
  const stack = newStack(originBase, delays)
  const originModel = originBase.readSync(0, ORIGIN_BYTES)
  const model = new Map<string, Uint8Array>([['origin', originModel]])
  let ops = 0
  const otherCount = 2 + random.int(2)
  for (let i = 0; i < otherCount; i++) {
    const spec: SnapshotSpec = { name: `s${i}`, kind: random.pick(KINDS), chunkBytes: random.pick(OTHER_CHUNKS), cowBytes: 4 * 1024 * 1024 }
    await addSnapshot(stack, spec, delays)
    model.set(spec.name, originModel.slice())
    ops += await randomBatch(stack, model, random, `${what} setup`)
  }
  const others = new Map([...model].filter(([view]) => view !== 'origin'))
  const originOnly = new Map([['origin', originModel]])

  const load = randomBatch(stack, others, random, `${what} load`, { originShare: 0 })
  const mergeSpec: SnapshotSpec = { name: 'm', kind: random.pick(['P', 'PO'] as const), chunkBytes: random.pick(MERGE_CHUNKS), cowBytes: 4 * 1024 * 1024 }
  const merging = await addSnapshot(stack, mergeSpec, delays)
  const mergedView = originModel.slice()
  if (exceptions === 1) {
    // One chunk differs: an origin write inside one chunk, or a write to the snapshot itself.
    const cb = mergeSpec.chunkBytes
    const chunk = random.int(Math.floor(ORIGIN_BYTES / cb))
    const length = 1 + random.int(cb)
    const at = chunk * cb + random.int(cb - length + 1)
    const data = random.bytes(length)
    if (random.chance(0.5)) {
      await stack.origin.write(data, at)
      originModel.set(data, at)
    } else {
      await merging.write(data, at)
      mergedView.set(data, at)
    }
  }
  const merge = await startMerge(stack.origin, merging, random.chance(0.5) ? { maxStepChunks: 1 } : {})
  assert.equal(merge.progress().totalChunks, exceptions, `${what}: chunks to merge`)
  originModel.set(mergedView)
  const during = randomBatch(stack, originOnly, random, `${what} merging`, { originShare: 1, discards: true })
  ops += (await load) + (await during)
  await merge.done
  assert.equal(merge.state, 'complete', `${what}: final state`)
  assert.equal(stack.origin.interceptor, null, `${what}: interceptor still installed`)
  assert.ok(!stack.origin.snapshots.includes(merging), `${what}: merged snapshot still attached`)
  assert.equal(merging.table.size, 0, `${what}: table not empty`)
  await checkViews(stack, model, `${what} after merge`)
  ops += await randomBatch(stack, model, random, `${what} after merge`)
  await checkViews(stack, model, `${what} final`)
  await stack.origin.close()
  return ops
}

test(`merge model: ${SMALL_MERGE_SEEDS.length * 2} merges of empty and one-chunk snapshots, started right after the snapshot under load, end`, async () => {
  let ops = 0
  for (const seed of SMALL_MERGE_SEEDS) {
    ops += await runSmallTrace(seed, 0)
    ops += await runSmallTrace(seed, 1)
  }
  console.log(`merge model: ${SMALL_MERGE_SEEDS.length * 2} empty and one-chunk merges, ${ops} I/O operations`)
})
