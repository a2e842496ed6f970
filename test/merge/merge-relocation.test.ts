/**
 * Relocation in the other snapshots during a merge (reference §8.5, invariants 44–46): the
 * test that fails without it, the global-counter wake-up and rescan, and a non-merging
 * snapshot whose COW fills up during relocation.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { startMerge } from '../../src/merge/merge.js'
import type { PendingException } from '../../src/snapshot/pending-exception.js'
import { Random } from '../support/random.js'
import { Scheduler } from '../support/scheduler.js'
import { type Stack, addSnapshot, makeSnapshot, newStack } from '../support/engine-stack.js'
import { Origin } from '../../src/snapshot/origin.js'
import type { Snapshot } from '../../src/snapshot/snapshot.js'
import { assertSameBytes } from './merge-support.js'

const KiB = 1024
const ORIGIN_BYTES = 512 * KiB

/**
 * m (16 KiB chunks) is taken first; then the origin changes in 8 scattered places, so m saves
 * those chunks; then s4 (4 KiB) and s64 (64 KiB) are taken: they read those chunks from the
 * origin. Merging m rolls those chunks back, which s4 and s64 must not see.
 */
async function scenario(seed: number): Promise<{ stack: Stack; before: Map<string, Uint8Array>; expectedOrigin: Uint8Array }> {
  const random = new Random(seed)
  const scheduler = new Scheduler(seed)
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(ORIGIN_BYTES)), scheduler)
  const m = await addSnapshot(stack, { name: 'm', kind: 'P', chunkBytes: 16 * KiB, cowBytes: 1024 * KiB }, scheduler)
  const expectedOrigin = await stack.origin.read(0, ORIGIN_BYTES)
  for (let i = 0; i < 8; i++) {
    const at = random.int(ORIGIN_BYTES - 6000)
    await stack.origin.write(random.bytes(6000), at)
  }
  await stack.origin.flush() // the writes may be answered before their copies commit (write-back)
  assert.ok(m.table.size >= 8)
  await addSnapshot(stack, { name: 's4', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 2048 * KiB }, scheduler)
  await addSnapshot(stack, { name: 's64', kind: 'N', chunkBytes: 64 * KiB, cowBytes: 2048 * KiB }, scheduler)
  const before = new Map<string, Uint8Array>()
  for (const name of ['s4', 's64']) before.set(name, await (stack.snapshots.get(name) as Snapshot).read(0, ORIGIN_BYTES))
  return { stack, before, expectedOrigin }
}

async function changedSnapshots(seed: number, unsafeSkipRelocation: boolean): Promise<string[]> {
  const { stack, before, expectedOrigin } = await scenario(seed)
  const merge = await startMerge(stack.origin, stack.snapshots.get('m') as Snapshot, { unsafeSkipRelocation })
  await merge.done
  assertSameBytes(await stack.origin.read(0, ORIGIN_BYTES), expectedOrigin, `seed ${seed}: origin after merge`)
  const changed: string[] = []
  for (const [name, bytes] of before) {
    const now = await (stack.snapshots.get(name) as Snapshot).read(0, ORIGIN_BYTES)
    if (Buffer.compare(Buffer.from(now), Buffer.from(bytes)) !== 0) changed.push(name)
  }
  await stack.origin.close()
  return changed
}

test('relocation: without triggering exceptions in the other snapshots they change under the merge (test guards §8.5)', async () => {
  for (const seed of [1, 2, 3]) {
    assert.deepEqual(await changedSnapshots(seed, false), [], `seed ${seed}: with relocation no other snapshot may change`)
    const changed = await changedSnapshots(seed, true)
    assert.deepEqual(changed.sort(), ['s4', 's64'], `seed ${seed}: with relocation switched off both other snapshots must change`)
  }
})

test('relocation: the merge sleeps on the global done counter and rescans; it never waits on the pending exceptions themselves', async () => {
  const random = new Random(7)
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(ORIGIN_BYTES)), null)
  const m = await addSnapshot(stack, { name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 1024 * KiB }, null)
  await stack.origin.write(random.bytes(4 * KiB), 64 * KiB)
  await addSnapshot(stack, { name: 's', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 1024 * KiB }, null)
  // A second origin sharing the same global counter: its completions are "unrelated".
  const sharedOrigin = new Origin(MemoryDevice.fromBytes(random.bytes(64 * KiB)), { events: stack.events })
  const unrelated = makeSnapshot({ name: 'u', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 256 * KiB }, new MemoryDevice(256 * KiB))
  await sharedOrigin.addSnapshot(unrelated)

  // The first scan reports a wait that never settles (as if a copy were stuck) and starts nothing.
  const real = stack.origin.triggerExceptions.bind(stack.origin)
  let calls = 0
  stack.origin.triggerExceptions = (offset, length) => {
    calls++
    if (calls === 1) return { waits: [new Promise<boolean>(() => {}) as PendingException['done']], invalidations: [] }
    return real(offset, length)
  }
  const merge = await startMerge(stack.origin, m)
  // The devices are plain memory: without the wait, the merge would be done within these turns.
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r))
  assert.equal(merge.stats.steps, 0, 'the merge must wait while a scan reports pending work')
  assert.equal(calls, 1)
  // A completion in an unrelated snapshot of another origin bumps the global counter: rescan.
  await sharedOrigin.write(new Uint8Array(512).fill(9), 0)
  await merge.done
  assert.ok(calls >= 2, `expected a rescan after the counter changed, got ${calls} scans`)
  assert.ok(merge.stats.relocationWaits >= 1)
  assert.equal(merge.state, 'complete')
  await sharedOrigin.close()
  await stack.origin.close()
})

test('relocation: a non-merging snapshot whose COW fills up becomes Invalid and the merge goes on (invariant 46)', async () => {
  const random = new Random(11)
  const scheduler = new Scheduler(11)
  const stack = newStack(MemoryDevice.fromBytes(random.bytes(ORIGIN_BYTES)), scheduler)
  const m = await addSnapshot(stack, { name: 'm', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 1024 * KiB }, scheduler)
  const expectedOrigin = await stack.origin.read(0, ORIGIN_BYTES)
  await stack.origin.write(random.bytes(200 * KiB), 100 * KiB)
  // Room for a header, one metadata area and 4 data chunks: relocation of 50 chunks overflows it.
  const tiny = await addSnapshot(stack, { name: 'tiny', kind: 'P', chunkBytes: 4 * KiB, cowBytes: 6 * 4 * KiB }, scheduler)
  const roomy = await addSnapshot(stack, { name: 'roomy', kind: 'PO', chunkBytes: 8 * KiB, cowBytes: 2048 * KiB }, scheduler)
  const roomyBefore = await roomy.read(0, ORIGIN_BYTES)
  const merge = await startMerge(stack.origin, m)
  await merge.done
  assert.equal(merge.state, 'complete')
  assert.equal(tiny.valid, false)
  assert.equal(tiny.statusText(), 'Invalid')
  assertSameBytes(await stack.origin.read(0, ORIGIN_BYTES), expectedOrigin, 'origin after merge')
  assertSameBytes(await roomy.read(0, ORIGIN_BYTES), roomyBefore, 'roomy snapshot after merge')
  await stack.origin.close()
})
