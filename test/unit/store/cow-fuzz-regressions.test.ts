/**
 * Cases found by npm run torture (COW image fuzzing), replayed as unit tests.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import { isSnapError } from '../../../src/errors.js'
import { ExceptionEvents } from '../../../src/snapshot/exception-events.js'
import { Origin } from '../../../src/snapshot/origin.js'
import { Snapshot } from '../../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../../src/store/persistent-store.js'

/** A COW with one exception (origin chunk 1) whose entry's old_chunk is then set to `oldChunk`. */
async function cowWithOldChunk(chunkBytes: number, oldChunk: bigint): Promise<Uint8Array> {
  const origin = new Origin(new MemoryDevice(8 * chunkBytes), { events: new ExceptionEvents(), writeBackBytes: 0 })
  const cow = new MemoryDevice(8 * chunkBytes)
  await origin.addSnapshot(new Snapshot({ name: 's', store: new PersistentStore(cow, { chunkBytes }) }))
  await origin.write(new Uint8Array(10).fill(7), chunkBytes)
  await origin.flush()
  const image = cow.readSync(0, cow.sizeBytes)
  await origin.close()
  // Entry 0 of area 0 (chunk 1): old_chunk u64 LE at offset 0, new_chunk at 8.
  new DataView(image.buffer).setBigUint64(chunkBytes, oldChunk, true)
  return image
}

async function openCow(image: Uint8Array, chunkBytes: number): Promise<unknown> {
  const origin = new Origin(new MemoryDevice(8 * chunkBytes), { events: new ExceptionEvents() })
  try {
    await origin.addSnapshot(new Snapshot({ name: 's', store: new PersistentStore(MemoryDevice.fromBytes(image), { chunkBytes }) }))
    return null
  } catch (err) {
    return err
  } finally {
    await origin.close()
  }
}

test('an entry naming an origin chunk beyond 2^53 bytes is corrupt metadata (torture seed 1, cow-images case 70)', async () => {
  // 512 B chunks: 2^44 + 3 used to escape as SNAP_OUT_OF_RANGE from the exception table.
  const err = await openCow(await cowWithOldChunk(512, 2n ** 44n + 3n), 512)
  assert.ok(isSnapError(err, 'SNAP_CORRUPT_METADATA'), `got ${String(err)}`)
  assert.match((err as Error).message, /origin chunk beyond 2\^53 bytes/)
  // 4 KiB chunks: 2^41 + 1 fits the table but no origin that large exists; it used to load.
  const err4k = await openCow(await cowWithOldChunk(4096, 2n ** 41n + 1n), 4096)
  assert.ok(isSnapError(err4k, 'SNAP_CORRUPT_METADATA'), `got ${String(err4k)}`)
  // The largest origin chunk that still fits below 2^53 bytes loads.
  assert.equal(await openCow(await cowWithOldChunk(4096, 2n ** 41n - 1n), 4096), null)
})
