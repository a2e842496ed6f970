/**
 * The origin write path's JavaScript work, counted: promises created per first-touch 4 KiB
 * write (async_hooks), with no snapshot and with one 4 KiB-chunk snapshot (write-back, the
 * default). Over memory devices, whose completions are microtasks, so the count is the same on
 * every run. Issue 15 asks for ≥ 10× fewer than before the extent engine (~19 per write with no
 * snapshot, ~56 with one); the bounds leave room for a little more bookkeeping, not for a promise
 * per layer again.
 */
import assert from 'node:assert/strict'
import { createHook } from 'node:async_hooks'
import { test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import { Snapshot } from '../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../src/store/persistent-store.js'
import { Random } from '../support/random.js'

const KiB = 1024
const MiB = 1024 * KiB
const WRITE_BYTES = 4 * KiB
const ORIGIN_BYTES = 8 * MiB
const QUEUE_DEPTH = 32

async function promisesPerWrite(snapshots: number): Promise<number> {
  const origin = new Origin(new MemoryDevice(ORIGIN_BYTES), { events: new ExceptionEvents() })
  for (let i = 0; i < snapshots; i++) {
    const store = new PersistentStore(new MemoryDevice(2 * ORIGIN_BYTES), { chunkBytes: 4 * KiB })
    await origin.addSnapshot(new Snapshot({ name: `s${i}`, store }))
  }
  const random = new Random(15)
  const count = ORIGIN_BYTES / WRITE_BYTES
  const order = Array.from({ length: count }, (_, i) => i)
  for (let i = count - 1; i > 0; i--) {
    const j = random.int(i + 1)
    ;[order[i], order[j]] = [order[j] as number, order[i] as number]
  }
  const data = random.bytes(WRITE_BYTES)
  let promises = 0
  const hook = createHook({
    init(_id, type) {
      if (type === 'PROMISE') promises++
    },
  })
  let next = 0
  // Each writer awaits its write: one promise per write is the caller's own (await's throwaway).
  const writer = async (): Promise<void> => {
    while (next < count) await origin.write(data, (order[next++] as number) * WRITE_BYTES)
  }
  hook.enable()
  try {
    await Promise.all(Array.from({ length: QUEUE_DEPTH }, writer))
    await origin.flush()
  } finally {
    hook.disable()
  }
  for (const s of origin.snapshots) assert.equal(s.table.size, count, 'every chunk saved')
  await origin.close()
  return promises / count
}

test('write path cost: a first-touch 4 KiB write with no snapshot creates at most 3 promises (caller included)', async () => {
  const perWrite = await promisesPerWrite(0)
  assert.ok(perWrite <= 3, `${perWrite.toFixed(2)} promises per write`)
})

test('write path cost: a first-touch 4 KiB write with one 4 KiB-chunk snapshot creates at most 3 promises (caller included)', async () => {
  const perWrite = await promisesPerWrite(1)
  assert.ok(perWrite <= 3, `${perWrite.toFixed(2)} promises per write`)
})
