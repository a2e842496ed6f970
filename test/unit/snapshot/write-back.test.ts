/**
 * Write-back on the origin: a first-touch write is answered once its copies are started and
 * lands on the device after they commit. These tests hold the COW's commits at a gate to look
 * inside that window, then check ordering, limits, FUA, flush, errors and snapshot creation; a
 * randomized test checks every read against a model while writes are still held.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { BlockDevice } from '../../../src/device/block-device.js'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import { isSnapError } from '../../../src/errors.js'
import { ExceptionEvents } from '../../../src/snapshot/exception-events.js'
import { Origin } from '../../../src/snapshot/origin.js'
import { Snapshot } from '../../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../../src/store/persistent-store.js'
import { TransientStore } from '../../../src/store/transient-store.js'
import { FaultyDevice } from '../../support/faulty-device.js'
import { Random } from '../../support/random.js'

const KiB = 1024

/** Holds every flush of a device until opened: a persistent COW cannot commit meanwhile. */
class FlushGate {
  private closed = true
  private waiters: Array<() => void> = []

  constructor(device: MemoryDevice) {
    const flush = device.flush.bind(device)
    device.flush = async () => {
      while (this.closed) await new Promise<void>((resolve) => this.waiters.push(resolve))
      return flush()
    }
  }

  open(): void {
    this.closed = false
    const waiters = this.waiters
    this.waiters = []
    for (const wake of waiters) wake()
  }

  close(): void {
    this.closed = true
  }
}

interface Rig {
  origin: Origin
  originBase: MemoryDevice
  originDev: FaultyDevice
  snap: Snapshot
  gate: FlushGate
  before: Uint8Array
}

async function rig(options: { sizeBytes?: number; chunkBytes?: number; writeBackBytes?: number } = {}): Promise<Rig> {
  const sizeBytes = options.sizeBytes ?? 256 * KiB
  const originBase = MemoryDevice.fromBytes(new Random(sizeBytes).bytes(sizeBytes))
  const originDev = new FaultyDevice(originBase)
  const origin = new Origin(originDev, {
    events: new ExceptionEvents(),
    ...(options.writeBackBytes === undefined ? {} : { writeBackBytes: options.writeBackBytes }),
  })
  const cow = new MemoryDevice(4 * sizeBytes)
  const snap = new Snapshot({ name: 's', store: new PersistentStore(cow, { chunkBytes: options.chunkBytes ?? 4 * KiB }) })
  await origin.addSnapshot(snap)
  const gate = new FlushGate(cow)
  return { origin, originBase, originDev, snap, gate, before: originBase.readSync(0, sizeBytes) }
}

const filled = (length: number, byte: number) => new Uint8Array(length).fill(byte)

/** True if `p` settles within a few turns of the event loop. */
async function settlesSoon(p: Promise<unknown>): Promise<boolean> {
  let settled = false
  p.then(
    () => (settled = true),
    () => (settled = true),
  )
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve))
  return settled
}

test('write-back: a first-touch write is answered before its copy commits; reads see it, the device and the snapshot do not', async () => {
  const { origin, originBase, snap, gate, before } = await rig()
  await origin.write(filled(4 * KiB, 7), 8 * KiB)
  assert.equal(snap.table.size, 0, 'the copy cannot have committed: the COW flush is held')
  assert.ok(origin.heldBytes >= 4 * KiB)
  assert.deepEqual(await origin.read(6 * KiB, 8 * KiB), Uint8Array.from([...before.subarray(6 * KiB, 8 * KiB), ...filled(4 * KiB, 7), ...before.subarray(12 * KiB, 14 * KiB)]))
  assert.deepEqual(originBase.readSync(8 * KiB, 4 * KiB), before.subarray(8 * KiB, 12 * KiB), 'the origin device must keep the old data until the commit')
  assert.deepEqual(await snap.read(8 * KiB, 4 * KiB), before.subarray(8 * KiB, 12 * KiB))
  const flushed = origin.flush()
  assert.equal(await settlesSoon(flushed), false, 'a flush must wait for the held write')
  gate.open()
  await flushed
  assert.equal(origin.heldBytes, 0)
  assert.equal(snap.table.size, 1)
  assert.deepEqual(originBase.readSync(8 * KiB, 4 * KiB), filled(4 * KiB, 7))
  assert.deepEqual(await snap.read(8 * KiB, 4 * KiB), before.subarray(8 * KiB, 12 * KiB))
  await origin.close()
})

test('write-back: a write with no copy to wait for still lands after the held write it overlaps', async () => {
  const { origin, originBase, gate } = await rig({ chunkBytes: 4 * KiB })
  gate.open()
  await origin.write(filled(4 * KiB, 1), 0)
  await origin.flush() // chunk 0 is saved: later writes to it need no copy
  gate.close()
  // Chunk 0 is saved, chunk 1 is not: held until chunk 1's copy commits.
  await origin.write(filled(8 * KiB, 2), 0)
  // Needs no copy and could go to the device at once, which would let the held write land over it.
  const later = origin.write(filled(1 * KiB, 4), 1 * KiB)
  assert.equal(await settlesSoon(later), true, 'ordered behind a held write, it is held too')
  const expected = Uint8Array.from([...filled(KiB, 2), ...filled(KiB, 4), ...filled(6 * KiB, 2)])
  assert.deepEqual(await origin.read(0, 8 * KiB), expected)
  gate.open()
  await origin.flush()
  assert.deepEqual(originBase.readSync(0, 8 * KiB), expected)
  await origin.close()
})

test('write-back: beyond the limit, and for FUA writes, the answer waits for the commit', async () => {
  const { origin, originBase, gate } = await rig({ writeBackBytes: 8 * KiB })
  await origin.write(filled(4 * KiB, 1), 0)
  await origin.write(filled(4 * KiB, 2), 16 * KiB)
  assert.equal(origin.heldBytes, 8 * KiB)
  const third = origin.write(filled(4 * KiB, 3), 32 * KiB)
  const fua = origin.write(filled(512, 4), 48 * KiB, { fua: true })
  assert.equal(await settlesSoon(third), false, 'the limit is reached: write-through')
  assert.equal(await settlesSoon(fua), false, 'a FUA write is answered only once durable')
  gate.open()
  await Promise.all([third, fua])
  assert.deepEqual(originBase.readSync(32 * KiB, 4 * KiB), filled(4 * KiB, 3))
  assert.deepEqual(originBase.readSync(48 * KiB, 512), filled(512, 4))
  await origin.close()
})

test('write-back: off (limit 0) answers only after the commit, as the kernel does', async () => {
  const { origin, gate } = await rig({ writeBackBytes: 0 })
  const write = origin.write(filled(4 * KiB, 1), 0)
  assert.equal(await settlesSoon(write), false)
  gate.open()
  await write
  await origin.close()
})

test('write-back: a held write keeps its own copy: the caller may reuse its buffer once answered', async () => {
  const { origin, originBase, gate } = await rig()
  const data = new Uint8Array(4 * KiB).fill(3)
  await origin.write(data, 0)
  assert.ok(origin.heldBytes > 0, 'held')
  data.fill(4)
  assert.deepEqual(await origin.read(0, 4 * KiB), filled(4 * KiB, 3))
  gate.open()
  await origin.flush()
  assert.deepEqual(originBase.readSync(0, 4 * KiB), filled(4 * KiB, 3))
  await origin.close()
})

test('write-back: a read that found a held write copies its bytes even if it landed, and its buffer was reused, meanwhile', async () => {
  // Held bytes live in pooled buffers; one goes back to the pool when its write lands. A read
  // that found the write before its device read started must still copy the right bytes.
  const { origin, originBase, gate } = await rig()
  await origin.write(filled(4 * KiB, 0xaa), 8 * KiB)
  const readInto = originBase.readInto.bind(originBase)
  let unblock!: () => void
  const blocked = new Promise<void>((resolve) => (unblock = resolve))
  let intercepted = false
  originBase.readInto = async (target, offset) => {
    if (!intercepted && offset === 8 * KiB) {
      intercepted = true
      await blocked
    }
    return readInto(target, offset)
  }
  const read = origin.read(8 * KiB, 4 * KiB)
  gate.open()
  await origin.flush() // the held write lands and leaves the set
  assert.equal(origin.heldBytes, 0)
  gate.close()
  // Later first-touch writes take buffers from the pool: the landed write's among them.
  for (let i = 0; i < 4; i++) await origin.write(filled(4 * KiB, 0xb0 + i), (40 + 8 * i) * KiB)
  unblock()
  assert.deepEqual(await read, filled(4 * KiB, 0xaa))
  gate.open()
  await origin.close()
})

test('write-back: a discard waits for the held writes it overlaps', async () => {
  const { origin, originBase, gate } = await rig()
  await origin.write(filled(8 * KiB, 1), 0)
  const discard = origin.discard(0, 4 * KiB)
  assert.equal(await settlesSoon(discard), false)
  gate.open()
  await discard
  await origin.flush()
  assert.deepEqual(originBase.readSync(0, 8 * KiB), Uint8Array.from([...filled(4 * KiB, 0), ...filled(4 * KiB, 1)]))
  await origin.close()
})

test('write-back: a held write that fails to land fails the next flush, once', async () => {
  const { origin, originDev, gate } = await rig()
  originDev.failWrites(1)
  await origin.write(filled(4 * KiB, 1), 0)
  gate.open()
  await assert.rejects(origin.flush(), (err: unknown) => isSnapError(err, 'SNAP_IO') && /write-back/.test(err.message))
  await origin.flush()
  await origin.close()
})

test('write-back: a snapshot created while writes are held contains them', async () => {
  const { origin, gate } = await rig()
  await origin.write(filled(4 * KiB, 9), 20 * KiB)
  const late = new Snapshot({ name: 'late', store: new TransientStore(new MemoryDevice(1024 * KiB), { chunkBytes: 4 * KiB }) })
  const adding = origin.addSnapshot(late)
  assert.equal(await settlesSoon(adding), false, 'creation drains the held write first')
  gate.open()
  await adding
  await origin.write(filled(4 * KiB, 10), 20 * KiB)
  assert.deepEqual(await late.read(20 * KiB, 4 * KiB), filled(4 * KiB, 9))
  assert.deepEqual(await origin.read(20 * KiB, 4 * KiB), filled(4 * KiB, 10))
  await origin.close()
})

test('write-back: random sequential I/O with slow devices; every read matches the model while writes are held', async () => {
  for (const seed of [11, 12, 13, 14]) {
    const random = new Random(seed)
    const sizeBytes = 192 * KiB
    const originBase = MemoryDevice.fromBytes(random.bytes(sizeBytes))
    const slow = (base: MemoryDevice): BlockDevice => {
      const dev = new FaultyDevice(base)
      dev.setDelay(() => (random.chance(0.5) ? 0 : random.int(4)))
      return dev
    }
    const origin = new Origin(slow(originBase), { events: new ExceptionEvents(), writeBackBytes: (4 + random.int(60)) * KiB })
    const model = originBase.readSync(0, sizeBytes)
    const snaps: Array<{ snap: Snapshot; content: Uint8Array }> = []
    const addSnap = async (i: number) => {
      const chunkBytes = random.pick([512, 4 * KiB, 16 * KiB, 64 * KiB])
      const store = random.chance(0.5)
        ? new PersistentStore(slow(new MemoryDevice(4 * sizeBytes)), { chunkBytes })
        : new TransientStore(slow(new MemoryDevice(4 * sizeBytes)), { chunkBytes })
      const snap = new Snapshot({ name: `s${i}`, store })
      await origin.addSnapshot(snap)
      snaps.push({ snap, content: model.slice() })
    }
    await addSnap(0)
    let maxHeld = 0
    try {
      for (let op = 0; op < 400; op++) {
        const length = 1 + random.int(random.chance(0.7) ? 6 * KiB : 40 * KiB)
        const at = random.int(sizeBytes - length + 1)
        const roll = random.int(100)
        if (roll < 45) {
          const data = random.bytes(length)
          await origin.write(data, at, { fua: random.chance(0.05) })
          model.set(data, at)
          maxHeld = Math.max(maxHeld, origin.heldBytes)
        } else if (roll < 75) {
          assert.deepEqual(await origin.read(at, length), model.subarray(at, at + length), `origin read ${at}+${length} at op ${op}`)
        } else if (roll < 88) {
          const { snap, content } = random.pick(snaps)
          assert.deepEqual(await snap.read(at, length), content.subarray(at, at + length), `${snap.snapshotName} read ${at}+${length} at op ${op}`)
        } else if (roll < 93) {
          await origin.discard(at, length)
          model.fill(0, at, at + length)
        } else if (roll < 97) {
          await origin.flush()
          assert.equal(origin.heldBytes, 0)
        } else if (snaps.length < 4) {
          await addSnap(snaps.length)
        }
      }
      await origin.flush()
      assert.ok(maxHeld > 0, 'no write was ever held: the test does not exercise write-back')
      assert.deepEqual(originBase.readSync(0, sizeBytes), model, 'origin device after the final flush')
      for (const { snap, content } of snaps) assert.deepEqual(await snap.read(0, sizeBytes), content, `${snap.snapshotName} at the end`)
    } catch (err) {
      throw new Error(`seed ${seed}: ${(err as Error).message}`, { cause: err })
    }
    await origin.close()
  }
})
