/**
 * The extent engine against the byte-array model: snapshots of 512 B to 512 KiB chunks over one
 * origin, hit by batches of concurrent origin writes that span many chunks and several metadata
 * areas (512 B chunks put 32 entries in an area), snapshot writes spanning saved and unsaved
 * runs (some with FUA), and reads of every view, in write-back and write-through modes. A seeded
 * Scheduler decides the completion order of every device operation; after each batch, every
 * view must equal its model, and after a reopen the persistent snapshots still must.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { BlockDevice } from '../../src/device/block-device.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import type { Snapshot } from '../../src/snapshot/snapshot.js'
import { type SnapshotSpec, type Stack, makeSnapshot, reopen, wrap } from '../support/engine-stack.js'
import { Random, streamSeed } from '../support/random.js'
import { Scheduler } from '../support/scheduler.js'

const KiB = 1024
const ORIGIN_BYTES = 2 * 1024 * KiB + 1536 // the last chunk of every snapshot above 512 B is partial
const CHUNK_SIZES = [512, 4 * KiB, 64 * KiB, 512 * KiB]

interface Op {
  readonly view: string
  readonly start: number
  readonly end: number
  readonly write: boolean
}

function newStack(originBase: MemoryDevice, scheduler: Scheduler, writeBackBytes: number): Stack {
  const events = new ExceptionEvents()
  return {
    origin: new Origin(wrap(originBase, scheduler, 'origin'), { events, writeBackBytes }),
    originBase,
    snapshots: new Map(),
    cowBases: new Map(),
    specs: new Map(),
    events,
  }
}

async function checkViews(stack: Stack, model: Map<string, Uint8Array>, what: string): Promise<void> {
  for (const [view, expected] of model) {
    const dev: BlockDevice = view === 'origin' ? stack.origin : (stack.snapshots.get(view) as Snapshot)
    const actual = await dev.read(0, expected.length)
    if (Buffer.compare(Buffer.from(actual), Buffer.from(expected)) !== 0) {
      let at = 0
      while (actual[at] === expected[at]) at++
      assert.fail(`${what}: view ${view} differs from the model at byte ${at}`)
    }
  }
}

async function runTrace(seed: number, writeBackBytes: number): Promise<{ cowWritesSaved: number }> {
  const random = new Random(streamSeed(seed, 'operations'))
  const scheduler = new Scheduler(seed)
  const originBase = MemoryDevice.fromBytes(random.bytes(ORIGIN_BYTES))
  let stack = newStack(originBase, scheduler, writeBackBytes)
  const model = new Map<string, Uint8Array>([['origin', originBase.readSync(0, ORIGIN_BYTES)]])
  const mode = writeBackBytes > 0 ? 'write-back' : 'write-through'
  for (const [i, chunkBytes] of CHUNK_SIZES.entries()) {
    const spec: SnapshotSpec = { name: `s${chunkBytes}`, kind: i === 1 ? 'N' : 'P', chunkBytes, cowBytes: 2 * ORIGIN_BYTES + 2 * 1024 * KiB }
    const base = new MemoryDevice(spec.cowBytes)
    const snap = makeSnapshot(spec, wrap(base, scheduler, spec.name))
    await stack.origin.addSnapshot(snap)
    stack.snapshots.set(spec.name, snap)
    stack.cowBases.set(spec.name, base)
    stack.specs.set(spec.name, spec)
    model.set(spec.name, (model.get('origin') as Uint8Array).slice())
  }
  const views = () => [...model.keys()]
  for (let batch = 0; batch < 14; batch++) {
    const what = `seed ${seed} ${mode} batch ${batch}`
    const ops: Op[] = []
    const clash = (o: Op) => ops.some((p) => p.view === o.view && p.start < o.end && o.start < p.end && (p.write || o.write))
    for (let n = 0; n < 10; n++) {
      const view = random.chance(0.55) ? 'origin' : random.pick(views())
      // Long writes span many chunks and metadata areas; short ones land inside chunks.
      const length = random.chance(0.4) ? 1 + random.int(256 * KiB) : random.chance(0.5) ? 512 * (1 + random.int(16)) : 1 + random.int(9000)
      const start = random.chance(0.3) ? 512 * random.int(Math.floor((ORIGIN_BYTES - length) / 512)) : random.int(ORIGIN_BYTES - length)
      const op = { view, start, end: start + length, write: random.chance(0.7) }
      if (!clash(op)) ops.push(op)
    }
    const jobs = ops.map(async (op) => {
      const dev: BlockDevice = op.view === 'origin' ? stack.origin : (stack.snapshots.get(op.view) as Snapshot)
      if (!op.write) return { op, data: await dev.read(op.start, op.end - op.start) }
      const data = random.bytes(op.end - op.start)
      await dev.write(data, op.start, { fua: random.chance(0.2) })
      return { op, data }
    })
    const results = await Promise.all(jobs)
    for (const { op, data } of results) {
      const expected = model.get(op.view) as Uint8Array
      if (op.write) expected.set(data, op.start)
      else assert.deepEqual(Buffer.from(data), Buffer.from(expected.subarray(op.start, op.end)), `${what}: read of ${op.view} [${op.start}, ${op.end})`)
    }
    await checkViews(stack, model, what)
  }
  let saved = 0
  for (const s of stack.snapshots.values()) saved += s.table.size
  assert.ok(saved > 0)
  const reopened = await reopen(stack, scheduler)
  stack = reopened.stack
  for (const name of reopened.dropped) model.delete(name)
  await checkViews(stack, model, `seed ${seed} ${mode} after reopen`)
  await stack.origin.close()
  return { cowWritesSaved: saved }
}

for (const writeBackBytes of [16 * 1024 * KiB, 0]) {
  test(`extent model: 512 B–512 KiB chunks, writes over many chunks and metadata areas (${writeBackBytes > 0 ? 'write-back' : 'write-through'})`, async () => {
    for (const seed of [1, 2, 3]) await runTrace(seed, writeBackBytes)
  })
}
