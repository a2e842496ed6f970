/**
 * Merge control and edge cases: refusals (invariants 39, 40, 50), status numbers (§8.9,
 * invariants 43, 51), failure handling (§8.7, invariant 49), pause/stop/resume (§8.6,
 * invariant 47), the rate limiter's arithmetic on an injected clock.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { BlockDevice } from '../../src/device/block-device.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { isSnapError } from '../../src/errors.js'
import { COMMITTING_STEPS, type MergeProgress, type MergeWindow, startMerge } from '../../src/merge/merge.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import type { Snapshot } from '../../src/snapshot/snapshot.js'
import { type SnapshotSpec, addSnapshot, makeSnapshot, newStack } from '../support/engine-stack.js'
import { FaultyDevice } from '../support/faulty-device.js'
import { ManualClock } from '../support/manual-clock.js'
import { Random } from '../support/random.js'
import { Scheduler } from '../support/scheduler.js'
import { assertSameBytes } from './merge-support.js'

const KiB = 1024

/** Writes 4 KiB blocks at `count` distinct random slots, in random order (short merge runs). */
async function scatterWrites(dev: BlockDevice, random: Random, count: number, blockBytes = 4 * KiB): Promise<void> {
  const slots = Array.from({ length: Math.floor(dev.sizeBytes / blockBytes) }, (_, i) => i)
  for (let i = slots.length - 1; i > 0; i--) {
    const j = random.int(i + 1)
    ;[slots[i], slots[j]] = [slots[j] as number, slots[i] as number]
  }
  for (const slot of slots.slice(0, count)) await dev.write(random.bytes(blockBytes), slot * blockBytes)
}

const refused = (err: unknown) => isSnapError(err, 'SNAP_MERGE_REFUSED')

test('refusals: transient store, second merge on the origin, invalid snapshot; no new snapshots while merging', async () => {
  const random = new Random(1)
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(256 * KiB)), null)
  const n = await addSnapshot(stack, { name: 'n', kind: 'N', chunkBytes: 4 * KiB, cowBytes: 512 * KiB }, null)
  const p1 = await addSnapshot(stack, { name: 'p1', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 512 * KiB }, null)
  const p2 = await addSnapshot(stack, { name: 'p2', kind: 'P', chunkBytes: 8 * KiB, cowBytes: 512 * KiB }, null)
  const bad = await addSnapshot(stack, { name: 'bad', kind: 'P', chunkBytes: 8 * KiB, cowBytes: 512 * KiB }, null)
  await bad.invalidate('test')
  await scatterWrites(stack.origin, random, 20)

  await assert.rejects(startMerge(stack.origin, n), refused, 'transient snapshot')
  await assert.rejects(startMerge(stack.origin, bad), refused, 'invalid snapshot')
  assert.equal(stack.origin.interceptor, null, 'a refusal must not install anything')

  const merge = await startMerge(stack.origin, p1, { rateBytesPerSecond: 64 * KiB })
  await assert.rejects(startMerge(stack.origin, p2), refused, 'second merge, other snapshot')
  await assert.rejects(startMerge(stack.origin, p1), refused, 'second merge, same snapshot while running')
  const late = makeSnapshot({ name: 'late', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 512 * KiB }, new MemoryDevice(512 * KiB))
  await assert.rejects(stack.origin.addSnapshot(late), (err) => isSnapError(err, 'SNAP_BUSY'), 'snapshot creation during a merge')
  await merge.stop()
  assert.equal(merge.state, 'stopped')
  // Still merging (stopped): another snapshot is still refused, the same one resumes.
  await assert.rejects(startMerge(stack.origin, p2), refused, 'other snapshot while one is stopped mid-merge')
  const resumed = await startMerge(stack.origin, p1)
  await resumed.done
  assert.equal(resumed.state, 'complete')
  // Merge done: a new merge of another snapshot is allowed.
  const second = await startMerge(stack.origin, p2)
  await second.done
  assert.equal(second.state, 'complete')
  await stack.origin.close()
})

test('status: allocated shrinks step by step across metadata areas and ends at allocated == metadata (§8.9)', async () => {
  const random = new Random(2)
  const originBytes = 1200 * KiB
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(originBytes)), null)
  const cowBytes = 2048 * KiB
  const m = await addSnapshot(stack, { name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes }, null)
  const chunkSectors = 8
  const totalSectors = cowBytes / 512
  assert.equal(m.statusText(), `${2 * chunkSectors}/${totalSectors} ${2 * chunkSectors}`)
  await scatterWrites(stack.origin, random, 280) // E = 256 for 4 KiB chunks: two areas
  const expected = await m.read(0, originBytes)
  // 280 data chunks + header + 2 areas.
  assert.equal(m.statusText(), `${283 * chunkSectors}/${totalSectors} ${3 * chunkSectors}`)

  const merge = await startMerge(stack.origin, m)
  const statuses: string[] = [merge.statusText()]
  const sizes: number[] = []
  merge.on('progress', () => {
    statuses.push(merge.statusText())
    sizes.push(m.table.size)
  })
  await merge.done
  const allocated = statuses.map((s) => Number(s.split('/')[0]))
  for (let i = 1; i < allocated.length; i++) {
    assert.ok((allocated[i] as number) <= (allocated[i - 1] as number), `allocated grew: ${statuses[i - 1]} -> ${statuses[i]}`)
  }
  assert.ok(statuses.some((s) => s.endsWith(` ${3 * chunkSectors}`)), 'metadata covered two areas during the merge')
  assert.equal(merge.statusText(), `${2 * chunkSectors}/${totalSectors} ${2 * chunkSectors}`)
  assert.equal(sizes.at(-1), 0)
  assert.equal(merge.stats.steps, statuses.length - 2, 'one progress event per step plus the final one')
  assertSameBytes(await stack.origin.read(0, originBytes), expected, 'origin after merge')
  await stack.origin.close()
})

test('batching: one step merges scattered 1-chunk runs across metadata areas; writes to any run of the window are held until the commit', async () => {
  const random = new Random(9)
  const originBytes = 2048 * KiB
  const origin = new Origin(MemoryDevice.fromBytes(random.bytes(originBytes)), { events: new ExceptionEvents() })
  const spec: SnapshotSpec = { name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 4096 * KiB }
  const cowDev = new FaultyDevice(new MemoryDevice(spec.cowBytes))
  const m = makeSnapshot(spec, cowDev)
  await origin.addSnapshot(m)
  const other = makeSnapshot({ name: 'o', kind: 'P', chunkBytes: 16 * KiB, cowBytes: 4096 * KiB }, new MemoryDevice(4096 * KiB))
  await origin.addSnapshot(other)
  // 300 random 4 KiB writes: 300 exceptions, 256 in the first area (E = 256), almost all runs of 1.
  await scatterWrites(origin, random, 300)
  const otherBefore = await other.read(0, originBytes)
  const expected = await m.read(0, originBytes)
  // Slow COW reads keep the first step open while a write lands in its LAST run.
  cowDev.setDelay((op) => (op === 'read' ? 2 : 0))
  const merge = await startMerge(origin, m)
  const windows: MergeWindow[] = []
  merge.on('window', (w) => windows.push(w))
  const window = await new Promise<MergeWindow>((resolve) => merge.once('window', resolve))
  const last = window.ranges.at(-1) as { firstChunk: number; count: number }
  const heldData = random.bytes(1000)
  const at = last.firstChunk * spec.chunkBytes + 10
  const heldWrite = origin.write(heldData, at)
  assert.equal(merge.view.heldCount, 1, 'a write to the last run of the window is held')
  expected.set(heldData, at)
  await heldWrite
  assert.equal(merge.window, null, 'the held write completed only after its step')
  await merge.done
  cowDev.setDelay(null)
  assert.equal(merge.state, 'complete')
  assert.equal(merge.stats.steps, 1, 'one step over both metadata areas')
  assert.deepEqual(
    windows.map((w) => w.count),
    [300],
  )
  assert.ok(windows.every((w) => w.ranges.length > w.count * 0.8), `runs per step: ${windows.map((w) => w.ranges.length)}`)
  assertSameBytes(await origin.read(0, originBytes), expected, 'origin after the merge')
  assertSameBytes(await other.read(0, originBytes), otherBefore, 'other snapshot after the merge')

  // maxStepChunks still bounds a step, now across runs.
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(512 * KiB)), null)
  const m2 = await addSnapshot(stack, { name: 'm2', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 1024 * KiB }, null)
  await scatterWrites(stack.origin, random, 50)
  const expected2 = await m2.read(0, 512 * KiB)
  const capped = await startMerge(stack.origin, m2, { maxStepChunks: 8 })
  const counts: number[] = []
  capped.on('window', (w) => counts.push(w.count))
  await capped.done
  assert.deepEqual(counts, [8, 8, 8, 8, 8, 8, 2])
  assertSameBytes(await stack.origin.read(0, 512 * KiB), expected2, 'origin after the capped merge')
  await stack.origin.close()
  await origin.close()
})

test('pipelining: later steps copy while step N flushes and commits; they commit only after N, steps flushed together commit as one, and N\'s held writes wait for N', async () => {
  const random = new Random(21)
  const originBytes = 512 * KiB
  const originBase = MemoryDevice.fromBytes(random.bytes(originBytes))
  // Origin flushes wait at a gate, so a step stays "committing" for as long as the test wants.
  let gateOpen = false
  let gateWaiters: Array<() => void> = []
  const flushOrigin = originBase.flush.bind(originBase)
  originBase.flush = async () => {
    while (!gateOpen) await new Promise<void>((resolve) => gateWaiters.push(resolve))
    return flushOrigin()
  }
  const origin = new Origin(originBase, { events: new ExceptionEvents() })
  const m = makeSnapshot({ name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 1024 * KiB }, new MemoryDevice(1024 * KiB))
  await origin.addSnapshot(m)
  await scatterWrites(origin, random, 40)
  gateOpen = true
  await origin.flush()
  gateOpen = false
  const expected = await m.read(0, originBytes)
  // Every table write, with the entries it removes: steps whose flushes end together share one.
  const commits: number[] = []
  const commitMerge = m.store.commitMerge.bind(m.store)
  m.store.commitMerge = (count, options) => {
    commits.push(count)
    return commitMerge(count, options)
  }
  const entries = m.table.size
  const merge = await startMerge(origin, m, { maxStepChunks: 8 })
  const windows: MergeWindow[] = []
  const committedAtWindow: boolean[] = []
  merge.on('window', (w) => {
    // Is the step before this one already out of the table?
    const before = windows.at(-1)
    committedAtWindow.push(before ? m.table.lookup(before.ranges[0]!.firstChunk) === -1 : true)
    windows.push(w)
  })
  const copying = COMMITTING_STEPS + 1
  for (let i = 0; i < 200 && windows.length < copying; i++) await new Promise((resolve) => setTimeout(resolve, 1))
  for (let i = 0; i < 20; i++) await new Promise((resolve) => setImmediate(resolve))
  assert.equal(windows.length, copying, `with step 1 unable to commit, steps 2..${copying} copy and the next one waits`)
  assert.deepEqual(committedAtWindow, [true, ...new Array<boolean>(COMMITTING_STEPS).fill(false)], 'the later steps were published while step 1 was still in the table')
  assert.deepEqual(commits, [], 'nothing commits before its flush')
  // A write to step 1's chunk is held until step 1 commits, then goes to the origin.
  const first = windows[0]!.ranges[0]!
  const heldData = random.bytes(100)
  const at = first.firstChunk * 4 * KiB + 7
  const held = origin.write(heldData, at)
  expected.set(heldData, at)
  assert.ok(merge.view.heldCount >= 1, 'the write to a committing step is held')
  gateOpen = true
  for (const wake of gateWaiters) wake()
  gateWaiters = []
  await held
  await merge.done
  assert.equal(merge.state, 'complete')
  assert.equal(merge.stats.steps, 5)
  // The gated steps' flushes ended together: step 1 commits first, and the steps whose
  // flushes ended while it did share the next table write.
  assert.equal(commits[0], windows[0]!.count, 'step 1 commits first, on its own')
  assert.equal(commits[1], windows[1]!.count + windows[2]!.count, 'steps 2 and 3, flushed while step 1 committed, share one table write')
  assert.ok(commits.length < merge.stats.steps, `${commits.length} table writes for ${merge.stats.steps} steps`)
  assert.equal(commits.reduce((a, b) => a + b, 0), entries, 'every entry left the table')
  assertSameBytes(await origin.read(0, originBytes), expected, 'origin after the pipelined merge')
  await origin.close()
})

type FaultKind = 'copy-read' | 'copy-write' | 'origin-flush' | 'commit'

async function failureCase(kind: FaultKind, seed: number): Promise<void> {
  const random = new Random(seed)
  const what = `${kind} (seed ${seed})`
  const originBytes = 512 * KiB
  const originBase = MemoryDevice.fromBytes(random.bytes(originBytes))
  const originDev = new FaultyDevice(originBase)
  const origin = new Origin(originDev, { events: new ExceptionEvents() })
  const spec: SnapshotSpec = { name: 'm', kind: 'P', chunkBytes: 8 * KiB, cowBytes: 1024 * KiB }
  const cowDev = new FaultyDevice(new MemoryDevice(spec.cowBytes))
  const m = makeSnapshot(spec, cowDev)
  await origin.addSnapshot(m)
  const other = makeSnapshot({ name: 'o', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 1024 * KiB }, new MemoryDevice(1024 * KiB))
  await scatterWrites(origin, random, 30, 8 * KiB)
  await origin.addSnapshot(other)
  await scatterWrites(origin, random, 10, 8 * KiB)
  const expected = await m.read(0, originBytes)
  const otherBefore = await other.read(0, originBytes)
  // Slow COW reads keep a step open long enough for a write to land in its window.
  cowDev.setDelay((op) => (op === 'read' ? 15 : 0))

  const merge = await startMerge(origin, m)
  const window = await new Promise<MergeWindow>((resolve) => merge.once('window', resolve))
  const first = window.ranges[0] as { firstChunk: number; count: number }
  const start = first.firstChunk * spec.chunkBytes
  const heldData = random.bytes(1000)
  switch (kind) {
    case 'copy-read':
      cowDev.failReads({ offset: 0, length: spec.cowBytes })
      break
    case 'copy-write':
      originDev.failWrites({ offset: start, length: first.count * spec.chunkBytes })
      break
    case 'origin-flush':
      originDev.failFlushes()
      break
    case 'commit':
      cowDev.failWrites()
      break
  }
  const held = origin.write(heldData, start + 100)
  await assert.rejects(held, (err) => isSnapError(err, 'SNAP_MERGE_FAILED'), `${what}: held write`)
  await assert.rejects(merge.done, (err) => isSnapError(err, 'SNAP_MERGE_FAILED'), `${what}: done`)
  assert.equal(merge.state, 'failed')
  assert.equal(m.mergeFailed, true)
  assert.equal(merge.statusText(), 'Merge failed')
  originDev.clearFaults()
  cowDev.clearFaults()
  cowDev.setDelay(null)
  // Everything else keeps working, with the merged view.
  assertSameBytes(await origin.read(0, originBytes), expected, `${what}: merged view after the failure`)
  const later = random.bytes(3000)
  await origin.write(later, 7000)
  expected.set(later, 7000)
  assertSameBytes(await origin.read(0, originBytes), expected, `${what}: merged view after a write`)
  // Restart: the merge resumes and completes; status still says Merge failed (kernel quirk).
  const again = await startMerge(origin, m)
  await again.done
  assert.equal(again.state, 'complete')
  assert.equal(again.statusText(), 'Merge failed')
  assertSameBytes(await origin.read(0, originBytes), expected, `${what}: origin after restarted merge`)
  assertSameBytes(await other.read(0, originBytes), otherBefore, `${what}: other snapshot`)
  await origin.close()
}

test('failure: copy/flush/commit errors fail the held writes of the step, set Merge failed, and the merge can be restarted (§8.7)', async () => {
  let seed = 40
  for (const kind of ['copy-read', 'copy-write', 'origin-flush', 'commit'] as const) await failureCase(kind, seed++)
})

test('pause, stop and AbortSignal take effect at step boundaries; resume continues from the end of the table', async () => {
  const random = new Random(5)
  const scheduler = new Scheduler(5)
  const originBytes = 512 * KiB
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(originBytes)), scheduler)
  const m = await addSnapshot(stack, { name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 1024 * KiB }, scheduler)
  await scatterWrites(stack.origin, random, 60)
  const expected = await m.read(0, originBytes)

  const merge = await startMerge(stack.origin, m, { maxStepChunks: 1 })
  await new Promise((r) => merge.once('progress', r))
  await merge.pause()
  assert.equal(merge.state, 'paused')
  assert.equal(merge.window, null, 'paused between steps')
  const steps = merge.stats.steps
  const remaining = m.table.size
  // A paused merge issues no I/O: once the turns in flight are done, the devices stay idle.
  for (let i = 0; i < 100; i++) await new Promise((r) => setImmediate(r))
  assert.equal(scheduler.waiting, 0, 'device operations pending while paused')
  assert.equal(merge.stats.steps, steps, 'no step while paused')
  assertSameBytes(await stack.origin.read(0, originBytes), expected, 'merged view while paused')
  merge.resume()
  await new Promise((r) => merge.once('progress', r))
  assert.ok(m.table.size < remaining)
  await merge.stop()
  assert.equal(merge.state, 'stopped')
  await merge.done
  assertSameBytes(await stack.origin.read(0, originBytes), expected, 'merged view while stopped')

  const controller = new AbortController()
  const second = await startMerge(stack.origin, m, { signal: controller.signal, maxStepChunks: 1 })
  await new Promise((r) => second.once('progress', r))
  controller.abort()
  await second.done
  assert.equal(second.state, 'stopped')
  assert.ok(m.table.size > 0)

  const third = await startMerge(stack.origin, m)
  await third.done
  assert.equal(third.state, 'complete')
  assertSameBytes(await stack.origin.read(0, originBytes), expected, 'origin after the merge')
  await stack.origin.close()
})

test('rate limit: on an injected clock the merge sleeps exactly until bytes/s is back at the limit; progress reports that rate and its ETA', async () => {
  const random = new Random(6)
  const scheduler = new Scheduler(6)
  const originBytes = 1024 * KiB
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(originBytes)), scheduler)
  const m = await addSnapshot(stack, { name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 2048 * KiB }, scheduler)
  await addSnapshot(stack, { name: 'o', kind: 'P', chunkBytes: 16 * KiB, cowBytes: 2048 * KiB }, scheduler)
  await scatterWrites(stack.origin, random, 150)
  const expected = await m.read(0, originBytes)
  const clock = new ManualClock(5000)
  const limit = 240 * KiB // 600 KiB at 240 KiB/s: 2.5 s of clock time, none of it waited for
  const merge = await startMerge(stack.origin, m, { rateBytesPerSecond: limit, clock })
  const totalBytes = merge.progress().totalBytes
  assert.equal(totalBytes, 150 * 4 * KiB)
  const stepBytes: number[] = []
  merge.on('window', (w) => stepBytes.push(w.count * 4 * KiB))
  let sleeps = 0
  for (;;) {
    const asleep = await Promise.race([merge.done.then(() => false), clock.whenPending().then(() => true)])
    if (!asleep) break
    sleeps++
    const p = merge.progress()
    const elapsedMs = (clock.nextDueMs() as number) - 5000
    // The wake-up is due exactly when the bytes done so far are at the limit.
    assert.ok(Math.abs(elapsedMs - (p.doneBytes / limit) * 1000) < 1e-6, `sleep ${sleeps}: due at ${elapsedMs} ms with ${p.doneBytes} bytes done`)
    clock.advanceToNext()
    // Woken at that moment, the measured rate is the limit and the ETA is what remains at it.
    const woken = merge.progress()
    assert.ok(Math.abs(woken.rateBytesPerSecond - limit) < 1e-6, `sleep ${sleeps}: reported rate ${woken.rateBytesPerSecond}`)
    assert.ok(Math.abs((woken.etaSeconds as number) - (totalBytes - woken.doneBytes) / limit) < 1e-9, `sleep ${sleeps}: ETA ${woken.etaSeconds}`)
    // Origin reads go on between steps and see the merged view.
    const at = random.int(originBytes - 4096)
    assertSameBytes(await stack.origin.read(at, 4096), expected.subarray(at, at + 4096), `origin read at ${at} during the merge`)
  }
  await merge.done
  const last = merge.progress()
  assert.equal(last.doneBytes, totalBytes)
  assert.equal(last.etaSeconds, 0)
  // A step merges at most 20 ms worth of the limit (at least one chunk): here one chunk each.
  assert.ok(stepBytes.every((b) => b === 4 * KiB), `step sizes ${stepBytes}`)
  // The whole merge took exactly its bytes at the limit of clock time (2.5 s), and none of it
  // was spent on the wall clock.
  assert.ok(sleeps > 50, `only ${sleeps} rate waits`)
  assert.ok(Math.abs(clock.now() - 5000 - (totalBytes / limit) * 1000) < 1e-6, `merge ended at ${clock.now() - 5000} ms of clock time`)
  assertSameBytes(await stack.origin.read(0, originBytes), expected, 'origin after the merge')
  await stack.origin.close()
})

test('setRate: lifting the limit lets a slow merge finish at once, with no clock time passing', async () => {
  const random = new Random(8)
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(256 * KiB)), null)
  const m: Snapshot = await addSnapshot(stack, { name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 512 * KiB }, null)
  await scatterWrites(stack.origin, random, 40)
  const clock = new ManualClock()
  const merge = await startMerge(stack.origin, m, { rateBytesPerSecond: 4 * KiB, clock })
  await clock.whenPending()
  // Two overlapping steps of one chunk, then a wait of 2 s for the 8 KiB done at 4 KiB/s.
  assert.equal(merge.stats.steps, 2)
  assert.equal(clock.nextDueMs(), 2000)
  merge.setRate(0)
  for (let i = 0; i < 1000 && merge.state === 'running'; i++) await new Promise((r) => setImmediate(r))
  assert.equal(merge.state, 'complete')
  assert.equal(clock.now(), 0, 'the clock never moved')
  assert.equal(clock.pending, 0, 'the rate wait was cancelled')
  await merge.done
  await stack.origin.close()
})
