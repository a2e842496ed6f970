/**
 * The first-touch ceiling device (bench/ceiling) must do the whole job it bounds, or its figure
 * bounds nothing: after seeded random writes through it, the origin holds every write, and the
 * COW it wrote, opened with the engine's own persistent store, is a snapshot that reads back the
 * origin as it was, with an exception for exactly the chunks written.
 */
import assert from 'node:assert/strict'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test } from 'node:test'
import { FirstTouchCeilingDevice } from '../../bench/ceiling/rand4k-device.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { Origin } from '../../src/snapshot/origin.js'
import { Snapshot } from '../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../src/store/persistent-store.js'
import { Random } from '../support/random.js'

const CHUNK = 4096
const SIZE = 4 * 1024 * 1024

for (const seed of [1, 2, 3]) {
  test(`first-touch ceiling device: its origin and COW are the job done (seed ${seed})`, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ceiling-'))
    try {
      const rng = new Random(seed)
      const before = rng.bytes(SIZE)
      const originPath = join(dir, 'origin')
      writeFileSync(originPath, before)
      const model = before.slice()
      const touched = new Set<number>()
      const device = new FirstTouchCeilingDevice(originPath, join(dir, 'cow'), SIZE, CHUNK)
      for (let group = 0; group < 40; group++) {
        // Up to 16 writes in flight at once, none overlapping another of its group.
        const writes: Array<Promise<void>> = []
        const taken: Array<[number, number]> = []
        for (let i = 0; i < 16; i++) {
          const length = (1 + rng.int(rng.int(4) === 0 ? 128 : 8)) * 512
          const offset = rng.int((SIZE - length) / 512 + 1) * 512
          if (taken.some(([a, b]) => offset < b && a < offset + length)) continue
          taken.push([offset, offset + length])
          const data = rng.bytes(length)
          model.set(data, offset)
          for (let c = Math.floor(offset / CHUNK); c <= Math.floor((offset + length - 1) / CHUNK); c++) touched.add(c)
          writes.push(device.write(data, offset, { fua: rng.int(8) === 0 }))
        }
        await Promise.all(writes)
        // Held writes show through reads before they land.
        const [a] = taken[rng.int(taken.length)] as [number, number]
        assert.deepEqual(await device.read(a, 8192 > SIZE - a ? SIZE - a : 8192), model.subarray(a, Math.min(SIZE, a + 8192)), `read at ${a}`)
        if (rng.int(5) === 0) await device.flush()
      }
      await device.close()
      assert.equal(device.copies, touched.size, 'one copy per chunk written')

      const after = new Uint8Array(readFileSync(originPath))
      assert.ok(Buffer.from(after).equals(Buffer.from(model)), 'the origin holds every write')
      const origin = new Origin(MemoryDevice.fromBytes(after))
      const snapshot = new Snapshot({ name: 'ceiling', store: new PersistentStore(MemoryDevice.fromBytes(readFileSync(join(dir, 'cow')))) })
      await origin.addSnapshot(snapshot)
      assert.ok(Buffer.from(await snapshot.read(0, SIZE)).equals(Buffer.from(before)), 'the snapshot reads the origin as it was')
      const inCow: number[] = []
      for (let offset = 0; offset < SIZE; ) {
        const run = snapshot.changedExtentAt(offset, SIZE)
        if (run.inCow) for (let c = offset / CHUNK; c < run.endBytes / CHUNK; c++) inCow.push(c)
        offset = run.endBytes
      }
      assert.deepEqual(inCow, [...touched].sort((x, y) => x - y), 'exceptions for exactly the chunks written')
      await origin.close()
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  })
}
