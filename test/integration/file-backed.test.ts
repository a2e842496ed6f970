/**
 * The engine over real files: grow-on-demand COW files with the usage threshold event, fixed
 * COW files that invalidate like the kernel, reopen from disk, and the chunk-size bounds.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { FileDevice } from '../../src/device/file-device.js'
import { isSnapError } from '../../src/errors.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import { Snapshot } from '../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../src/store/persistent-store.js'
import { TransientStore } from '../../src/store/transient-store.js'
import { Random } from '../support/random.js'

let dir = ''
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'blocksnap-file-'))
})
after(async () => {
  await rm(dir, { recursive: true, force: true })
})

const MiB = 1024 * 1024

async function openOrigin(path: string, sizeBytes?: number): Promise<Origin> {
  const dev = await FileDevice.open(path, sizeBytes === undefined ? {} : { create: sizeBytes })
  return new Origin(dev, { events: new ExceptionEvents() })
}

test('file-backed: a grow-on-demand COW grows instead of invalidating and fires the threshold once', async () => {
  const origin = await openOrigin(join(dir, 'grow-origin'), 8 * MiB)
  const cow = await FileDevice.open(join(dir, 'grow-cow'), { create: 0, resizable: true })
  const snap = new Snapshot({
    name: 'g',
    store: new PersistentStore(cow, { chunkBytes: 4096, growable: true }),
    usageThresholdBytes: 2 * MiB,
  })
  const events: unknown[] = []
  snap.emitter.on('threshold', (e) => events.push(e))
  await origin.addSnapshot(snap)
  const random = new Random(5)
  const data = random.bytes(6 * MiB)
  await origin.write(data, 0)
  await origin.flush() // the write may be answered before its copies commit (write-back)
  assert.ok(snap.valid)
  assert.equal(snap.table.size, (6 * MiB) / 4096)
  assert.equal(events.length, 1)
  assert.ok((await stat(join(dir, 'grow-cow'))).size >= 6 * MiB)
  assert.deepEqual(await snap.read(0, 4096), new Uint8Array(4096))
  await origin.close()
})

test('file-backed: a fixed-size COW file invalidates when full, like the kernel', async () => {
  const origin = await openOrigin(join(dir, 'fixed-origin'), 1 * MiB)
  const cow = await FileDevice.open(join(dir, 'fixed-cow'), { create: 64 * 1024 })
  const snap = new Snapshot({ name: 'f', store: new PersistentStore(cow, { chunkBytes: 4096 }) })
  await origin.addSnapshot(snap)
  await origin.write(new Uint8Array(1 * MiB).fill(1), 0)
  assert.equal(snap.statusText(), 'Invalid')
  await origin.close()
})

test('file-backed: persistent snapshots reopen from disk with identical views and status', async () => {
  const random = new Random(9)
  const originPath = join(dir, 'reopen-origin')
  const initial = random.bytes(2 * MiB + 512)
  {
    const dev = await FileDevice.open(originPath, { create: initial.length })
    await dev.write(initial, 0)
    await dev.close()
  }
  const chunkSizes = [512, 4096, 65536, 512 * 1024]
  let origin = await openOrigin(originPath)
  for (const chunkBytes of chunkSizes) {
    const cow = await FileDevice.open(join(dir, `reopen-cow-${chunkBytes}`), { create: 8 * MiB })
    await origin.addSnapshot(new Snapshot({ name: `c${chunkBytes}`, store: new PersistentStore(cow, { chunkBytes }) }))
  }
  for (let i = 0; i < 40; i++) {
    const len = 1 + random.int(100000)
    await origin.write(random.bytes(len), random.int(initial.length - len))
  }
  const firstSnap = origin.snapshots.find((s) => s.chunkBytes === 4096) as Snapshot
  await firstSnap.write(random.bytes(5000), 1234)
  const views = new Map<number, Uint8Array>()
  const statuses = new Map<number, string>()
  for (const s of origin.snapshots) {
    views.set(s.chunkBytes, await s.read(0, initial.length))
    statuses.set(s.chunkBytes, s.statusText())
  }
  for (const [chunkBytes, view] of views) {
    if (chunkBytes !== 4096) assert.deepEqual(view, initial, `chunk ${chunkBytes} lost the point-in-time view`)
  }
  const originView = await origin.read(0, initial.length)
  await origin.close()

  origin = await openOrigin(originPath)
  for (const chunkBytes of chunkSizes) {
    const cow = await FileDevice.open(join(dir, `reopen-cow-${chunkBytes}`))
    // chunkBytes 0: taken from the header, as when the kernel loads an existing COW.
    await origin.addSnapshot(new Snapshot({ name: `c${chunkBytes}`, store: new PersistentStore(cow) }))
  }
  assert.deepEqual(await origin.read(0, initial.length), originView)
  for (const s of origin.snapshots) {
    assert.deepEqual(await s.read(0, initial.length), views.get(s.chunkBytes))
    assert.equal(s.statusText(), statuses.get(s.chunkBytes), `status of chunk ${s.chunkBytes} after reload (invariant 13)`)
  }
  await origin.close()
})

test('chunk sizes: 512 B to 512 KiB powers of two are accepted, anything else refused', () => {
  const cow = { blockSizeBytes: 512 } as never
  for (const bad of [256, 1000, 3072, 1024 * 1024]) {
    assert.throws(
      () => new PersistentStore(cow, { chunkBytes: bad }),
      (err: unknown) => isSnapError(err, 'SNAP_BAD_CHUNK_SIZE'),
      `chunk ${bad}`,
    )
  }
  assert.throws(() => new TransientStore(cow, { chunkBytes: 0 }), (err: unknown) => isSnapError(err, 'SNAP_BAD_CHUNK_SIZE'))
  for (let c = 512; c <= 512 * 1024; c *= 2) assert.equal(new PersistentStore(cow, { chunkBytes: c }).chunkBytes, c)
})
