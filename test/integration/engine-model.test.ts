/**
 * Model-based randomized test of the engine: an origin with several snapshots of different
 * chunk sizes and store kinds, hit by batches of concurrent reads and writes (random byte
 * offsets and lengths, chunk-spanning), flushes, live snapshot creation in the middle of a
 * batch, removal and reopen. The model is one plain byte array per view.
 *
 * One Scheduler per trace decides the completion order of every device operation, from its
 * own stream of the seed; the operations come from another stream. A printed seed replays
 * exactly, which the replay test checks.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import type { BlockDevice } from '../../src/device/block-device.js'
import { createHash } from 'node:crypto'
import { COW_THRESHOLD } from '../../src/snapshot/snapshot.js'
import { Random, streamSeed } from '../support/random.js'
import { Scheduler } from '../support/scheduler.js'
import { type SnapshotSpec, type Stack, type StoreKind, addSnapshot, newStack, reopen } from '../support/engine-stack.js'

const ORIGIN_BYTES = 192 * 1024 + 1536 // not a multiple of any chunk size above 512 (§11.7)
const CHUNK_SIZES = [512, 4096, 16384, 65536]
const KINDS: StoreKind[] = ['P', 'PO', 'N']

interface Range {
  view: string
  start: number
  end: number
}

function overlaps(a: Range, b: Range): boolean {
  return a.view === b.view && a.start < b.end && b.start < a.end
}

async function checkAllViews(stack: Stack, model: Map<string, Uint8Array>, seed: number, step: number): Promise<void> {
  for (const [view, expected] of model) {
    const dev: BlockDevice = view === 'origin' ? stack.origin : (stack.snapshots.get(view) as BlockDevice)
    const actual = await dev.read(0, expected.length)
    if (Buffer.compare(Buffer.from(actual), Buffer.from(expected)) !== 0) {
      let at = 0
      while (actual[at] === expected[at]) at++
      assert.fail(`seed ${seed} step ${step}: view ${view} differs from the model at byte ${at}`)
    }
  }
}

interface TraceResult {
  readonly ops: number
  /** Snapshots created while origin writes issued before them were still in flight. */
  readonly createdUnderLoad: number
  /** Origin writes in flight at those creations, in all. */
  readonly writesInFlightAtCreation: number
  /** sha256 over every view's final bytes. */
  readonly finalHash: string
}

async function runTrace(seed: number, steps: number, scheduler = new Scheduler(seed)): Promise<TraceResult> {
  const random = new Random(streamSeed(seed, 'operations'))
  const originBase = MemoryDevice.fromBytes(random.bytes(ORIGIN_BYTES))
  let stack = newStack(originBase, scheduler)
  const model = new Map<string, Uint8Array>([['origin', originBase.readSync(0, ORIGIN_BYTES)]])
  let serial = 0
  let ops = 0
  let createdUnderLoad = 0
  let writesInFlightAtCreation = 0

  const nextSpec = (kind?: StoreKind, chunkBytes?: number): SnapshotSpec => ({
    name: `s${serial++}`,
    kind: kind ?? random.pick(KINDS),
    chunkBytes: chunkBytes ?? random.pick(CHUNK_SIZES),
    cowBytes: 4 * 1024 * 1024,
  })
  const createSnapshot = async (spec: SnapshotSpec) => {
    await addSnapshot(stack, spec, scheduler)
    model.set(spec.name, (model.get('origin') as Uint8Array).slice())
  }
  // At least three snapshots with different chunk sizes from the start.
  await createSnapshot(nextSpec('P', 4096))
  await createSnapshot(nextSpec('PO', 65536))
  await createSnapshot(nextSpec('N', 512))

  for (let step = 0; step < steps; step++) {
    const roll = random.next()
    // Live creation in the middle of a batch (below), while its earlier writes are in flight.
    const liveSpec = roll < 0.06 && stack.snapshots.size < 6 ? nextSpec() : null
    if (!liveSpec && roll < 0.08 && stack.snapshots.size > 3) {
      const name = random.pick([...stack.snapshots.keys()])
      const snap = stack.snapshots.get(name)
      if (snap) await stack.origin.removeSnapshot(snap)
      stack.snapshots.delete(name)
      stack.cowBases.delete(name)
      stack.specs.delete(name)
      model.delete(name)
      continue
    }
    if (!liveSpec && roll < 0.1) {
      const reopened = await reopen(stack, scheduler)
      stack = reopened.stack
      for (const name of reopened.dropped) model.delete(name)
      await checkAllViews(stack, model, seed, step)
      continue
    }
    // A batch of concurrent operations on non-conflicting ranges of each view.
    const batch: Array<Promise<void>> = []
    const claimed: Range[] = []
    const size = 1 + random.int(12)
    const views = [...model.keys()]
    const creationAt = liveSpec ? random.int(size + 1) : -1
    let creation: Promise<unknown> | null = null
    let originWritesIssued = 0
    for (let i = 0; i <= size; i++) {
      if (i === creationAt && liveSpec) {
        // Origin.addSnapshot holds new origin mutations and drains the ones in flight: every
        // origin write issued so far (each entered its mutation synchronously, see below) is in
        // the snapshot, every one issued from here on is not. So the new view's model is the
        // origin model as it stands at this call.
        const inFlight = originWritesIssued
        creation = addSnapshot(stack, liveSpec, scheduler)
        model.set(liveSpec.name, (model.get('origin') as Uint8Array).slice())
        if (inFlight > 0) {
          createdUnderLoad++
          writesInFlightAtCreation += inFlight
        }
      }
      if (i === size) break
      const view = random.chance(0.5) ? 'origin' : random.pick(views)
      const length = random.chance(0.3) ? 1 + random.int(200) : 1 + random.int(70000)
      const start = random.int(ORIGIN_BYTES - length + 1)
      const range = { view, start, end: start + length }
      if (claimed.some((r) => overlaps(r, range))) continue
      claimed.push(range)
      const dev: BlockDevice = view === 'origin' ? stack.origin : (stack.snapshots.get(view) as BlockDevice)
      const viewModel = model.get(view) as Uint8Array
      ops++
      const kind = random.next()
      // An origin write over the copy throttle waits before it enters its mutation, so which side
      // of a live creation it lands on would be open: the model only issues writes that enter.
      const throttled = view === 'origin' && stack.origin.snapshots.some((s) => s.copiesInFlight > COW_THRESHOLD)
      if (kind < 0.55 && !throttled) {
        const data = random.bytes(length)
        viewModel.set(data, start)
        if (view === 'origin') originWritesIssued++
        batch.push(dev.write(data, start, { fua: random.chance(0.1) }))
      } else if (kind < 0.95) {
        const expected = viewModel.slice(start, start + length)
        batch.push(
          dev.read(start, length).then((actual) => {
            if (Buffer.compare(Buffer.from(actual), Buffer.from(expected)) !== 0) {
              assert.fail(`seed ${seed} step ${step}: read of ${view} [${start}, +${length}) differs from the model`)
            }
          }),
        )
      } else {
        batch.push(dev.flush())
      }
    }
    await Promise.all(batch)
    if (creation) {
      await creation
      // Check the new view at once, before later batches blur it.
      const snap = stack.snapshots.get((liveSpec as SnapshotSpec).name) as BlockDevice
      const actual = await snap.read(0, ORIGIN_BYTES)
      const expected = model.get((liveSpec as SnapshotSpec).name) as Uint8Array
      if (Buffer.compare(Buffer.from(actual), Buffer.from(expected)) !== 0) {
        let at = 0
        while (actual[at] === expected[at]) at++
        assert.fail(`seed ${seed} step ${step}: snapshot ${(liveSpec as SnapshotSpec).name} created under load differs from the model at byte ${at}`)
      }
    }
    if (step % 10 === 9) await checkAllViews(stack, model, seed, step)
  }
  await checkAllViews(stack, model, seed, steps)
  for (const s of stack.snapshots.values()) assert.ok(s.valid, `seed ${seed}: snapshot ${s.snapshotName} became invalid`)
  const hash = createHash('sha256')
  for (const [view, bytes] of [...model].sort(([a], [b]) => (a < b ? -1 : 1))) hash.update(view).update(bytes)
  await stack.origin.close()
  return { ops, createdUnderLoad, writesInFlightAtCreation, finalHash: hash.digest('hex') }
}

const SEEDS = Array.from({ length: 20 }, (_, i) => i + 1)

test('engine model: concurrent random I/O on an origin with mixed snapshots matches the model', async () => {
  let ops = 0
  let createdUnderLoad = 0
  let inFlight = 0
  for (const seed of SEEDS) {
    const r = await runTrace(seed, 80)
    ops += r.ops
    createdUnderLoad += r.createdUnderLoad
    inFlight += r.writesInFlightAtCreation
  }
  console.log(`# engine model: ${SEEDS.length} seeds, ${ops} concurrent operations, ${createdUnderLoad} snapshots created over ${inFlight} origin writes in flight`)
  assert.ok(ops > 6000, `only ${ops} operations ran`)
  assert.ok(createdUnderLoad >= SEEDS.length, `only ${createdUnderLoad} snapshots were created while origin writes were in flight`)
})

test('engine model: a seed replays exactly (same device completion order, same bytes); another seed does not', async () => {
  const run = async (seed: number) => {
    const scheduler = new Scheduler(seed, { record: true })
    const result = await runTrace(seed, 40, scheduler)
    return { trace: scheduler.trace, digest: scheduler.digest, finalHash: result.finalHash }
  }
  const first = await run(7)
  const again = await run(7)
  const other = await run(8)
  assert.ok(first.trace.length > 1000, `only ${first.trace.length} device completions`)
  assert.deepEqual(again.trace, first.trace, 'seed 7 replayed a different completion order')
  assert.equal(again.digest, first.digest)
  assert.equal(again.finalHash, first.finalHash, 'seed 7 replayed to different bytes')
  assert.notEqual(other.digest, first.digest, 'seeds 7 and 8 gave the same completion order')
  assert.notEqual(other.finalHash, first.finalHash, 'seeds 7 and 8 gave the same bytes')
})
