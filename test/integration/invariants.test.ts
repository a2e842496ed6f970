/**
 * The dm-snapshot invariants of reference §11 that belong to the engine, one named test each
 * (numbers in the names). Store-level ones (9–17, 19–21, 26–28) live in test/unit/store.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { isSnapError } from '../../src/errors.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import { COW_THRESHOLD, Snapshot } from '../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../src/store/persistent-store.js'
import { TransientStore } from '../../src/store/transient-store.js'
import { FaultyDevice } from '../support/faulty-device.js'
import { Random } from '../support/random.js'

const KiB = 1024

function filled(length: number, byte: number): Uint8Array {
  return new Uint8Array(length).fill(byte)
}

async function rejectsCode(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => isSnapError(err) && err.code === code)
}

interface Setup {
  origin: Origin
  originBase: MemoryDevice
  originDev: FaultyDevice
}

// These invariants pin the kernel's ordering, where an origin write completes only after its
// copies commit, so write-back is off here; test/unit/snapshot/write-back.test.ts covers it.
function setup(sizeBytes: number, seed = 1): Setup {
  const originBase = MemoryDevice.fromBytes(new Random(seed).bytes(sizeBytes))
  const originDev = new FaultyDevice(originBase)
  return { origin: new Origin(originDev, { events: new ExceptionEvents(), writeBackBytes: 0 }), originBase, originDev }
}

function persistent(name: string, chunkBytes: number, cowBytes: number, options: { overflow?: boolean; discard?: boolean; passdown?: boolean } = {}) {
  const cowBase = new MemoryDevice(cowBytes)
  const cow = new FaultyDevice(cowBase)
  const snap = new Snapshot({
    name,
    store: new PersistentStore(cow, { chunkBytes }),
    ...(options.overflow ? { overflow: true } : {}),
    ...(options.discard ? { discardZeroesCow: true } : {}),
    ...(options.passdown ? { discardPassdownOrigin: true } : {}),
  })
  return { snap, cow, cowBase }
}

test('invariant 1: a snapshot keeps the origin content of its creation time', async () => {
  const { origin, originBase } = setup(64 * KiB)
  const before = originBase.readSync(0, 64 * KiB)
  const { snap } = persistent('s', 4 * KiB, 1024 * KiB)
  await origin.addSnapshot(snap)
  await origin.write(filled(64 * KiB, 0xaa), 0)
  await origin.write(filled(100, 0xbb), 5000)
  assert.deepEqual(await snap.read(0, 64 * KiB), before)
})

test('invariant 2: the origin reads its latest writes whatever the snapshots', async () => {
  const { origin } = setup(64 * KiB)
  await origin.addSnapshot(persistent('a', 4 * KiB, 1024 * KiB).snap)
  await origin.addSnapshot(persistent('b', 64 * KiB, 1024 * KiB).snap)
  await origin.write(filled(10, 7), 4090)
  assert.deepEqual(await origin.read(4090, 10), filled(10, 7))
})

test('invariant 3: a snapshot write changes only that snapshot', async () => {
  const { origin, originBase } = setup(64 * KiB)
  const before = originBase.readSync(0, 64 * KiB)
  const a = persistent('a', 4 * KiB, 1024 * KiB).snap
  const b = persistent('b', 16 * KiB, 1024 * KiB).snap
  await origin.addSnapshot(a)
  await origin.addSnapshot(b)
  await a.write(filled(9000, 0x11), 3000)
  assert.deepEqual(await origin.read(0, 64 * KiB), before)
  assert.deepEqual(await b.read(0, 64 * KiB), before)
  assert.deepEqual(await a.read(3000, 9000), filled(9000, 0x11))
  assert.deepEqual(await a.read(0, 3000), before.subarray(0, 3000))
})

test('invariant 4: origin writes before activation are not preserved', async () => {
  const { origin } = setup(16 * KiB)
  await origin.write(filled(16 * KiB, 1), 0)
  const { snap } = persistent('s', 4 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  assert.deepEqual(await snap.read(0, 16 * KiB), filled(16 * KiB, 1))
})

test('invariant 5: a write spanning many small chunks preserves every chunk it touches', async () => {
  const { origin, originBase } = setup(64 * KiB)
  const before = originBase.readSync(0, 64 * KiB)
  const small = persistent('small', 512, 1024 * KiB).snap
  const large = persistent('large', 64 * KiB, 1024 * KiB).snap
  await origin.addSnapshot(large)
  await origin.addSnapshot(small)
  await origin.write(filled(20000, 0x5a), 777)
  assert.deepEqual(await small.read(0, 64 * KiB), before)
  assert.deepEqual(await large.read(0, 64 * KiB), before)
  assert.equal(small.table.size, Math.ceil((777 + 20000) / 512) - Math.floor(777 / 512))
})

test('invariant 6: a larger chunk is saved whole on the first write, and only once', async () => {
  const { origin } = setup(128 * KiB)
  const { snap } = persistent('s', 64 * KiB, 1024 * KiB)
  await origin.addSnapshot(snap)
  await origin.write(filled(10, 1), 100)
  const after1 = snap.usage().allocatedSectors
  await origin.write(filled(10, 2), 60 * KiB)
  assert.equal(snap.table.size, 1)
  assert.equal(snap.usage().allocatedSectors, after1)
})

test('invariant 7: a partial last chunk is copied with its partial length', async () => {
  const size = 10 * KiB + 512
  const { origin, originBase } = setup(size)
  const before = originBase.readSync(0, size)
  const { snap } = persistent('s', 4 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  await origin.write(filled(512, 9), size - 512)
  assert.deepEqual(await snap.read(8 * KiB, size - 8 * KiB), before.subarray(8 * KiB))
  assert.deepEqual(await origin.read(size - 512, 512), filled(512, 9))
})

test('invariant 8: sectors beyond a snapshot never trigger copies for it', async () => {
  const { origin } = setup(16 * KiB)
  const { snap } = persistent('s', 4 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  assert.equal(snap.protectOriginChunk(16 * KiB, []), null)
  assert.equal(snap.table.size, 0)
})

test('invariant 18: copy error invalidates, the origin write still succeeds, queued snapshot writes fail', async () => {
  const { origin, originDev } = setup(16 * KiB)
  const { snap, cowBase } = persistent('s', 4 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  originDev.failReads(1)
  const originWrite = origin.write(filled(4 * KiB, 3), 0)
  const snapWrite = snap.write(filled(10, 4), 100)
  await originWrite
  await rejectsCode(snapWrite, 'SNAP_INVALID')
  assert.equal(snap.statusText(), 'Invalid')
  assert.equal(cowBase.readSync(4, 1)[0], 0, 'header valid field must be 0')
  assert.deepEqual(await origin.read(0, 4 * KiB), filled(4 * KiB, 3))
})

test('invariant 20: out-of-order copy completion still commits in allocation order', async () => {
  const { origin, originDev } = setup(64 * KiB)
  const { snap, cowBase } = persistent('s', 4 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  // First copies are the slowest: they complete last.
  originDev.setDelay((op, offset) => (op === 'read' ? 30 - offset / 4096 : 0))
  await Promise.all([0, 1, 2, 3, 4, 5].map((c) => origin.write(filled(1, c), c * 4 * KiB)))
  const area = cowBase.readSync(4 * KiB, 6 * 16)
  const view = new DataView(area.buffer, area.byteOffset)
  const newChunks = [0, 1, 2, 3, 4, 5].map((i) => view.getUint32(i * 16 + 8, true))
  assert.deepEqual(newChunks, [2, 3, 4, 5, 6, 7])
})

test('invariant 22: a full COW on an origin write invalidates the snapshot; the write succeeds', async () => {
  const { origin } = setup(64 * KiB)
  // Room for the header, area 0 and exactly two data chunks.
  const { snap } = persistent('s', 4 * KiB, 16 * KiB)
  await origin.addSnapshot(snap)
  await origin.write(filled(4 * KiB * 3, 8), 0)
  assert.equal(snap.statusText(), 'Invalid')
  assert.deepEqual(await origin.read(0, 12 * KiB), filled(12 * KiB, 8))
  await rejectsCode(snap.read(0, 512), 'SNAP_INVALID')
  await rejectsCode(snap.write(filled(1, 1), 0), 'SNAP_INVALID')
})

test('invariant 23: a full COW on a snapshot write with P fails the write and invalidates', async () => {
  const { origin } = setup(64 * KiB)
  const { snap } = persistent('s', 4 * KiB, 12 * KiB)
  await origin.addSnapshot(snap)
  await snap.write(filled(10, 1), 0)
  await rejectsCode(snap.write(filled(10, 1), 8 * KiB), 'SNAP_INVALID')
  assert.equal(snap.statusText(), 'Invalid')
})

test('invariant 24: a full COW with PO overflows: writes fail, reads still work, reload clears it', async () => {
  const { origin, originBase } = setup(64 * KiB)
  const before = originBase.readSync(0, 64 * KiB)
  const { snap, cowBase } = persistent('s', 4 * KiB, 12 * KiB, { overflow: true })
  await origin.addSnapshot(snap)
  await snap.write(filled(10, 1), 0)
  await rejectsCode(snap.write(filled(10, 1), 8 * KiB), 'SNAP_OVERFLOW')
  assert.equal(snap.statusText(), 'Overflow')
  await rejectsCode(snap.write(filled(1, 2), 0), 'SNAP_OVERFLOW')
  assert.deepEqual(await snap.read(8 * KiB, 4 * KiB), before.subarray(8 * KiB, 12 * KiB))
  assert.deepEqual(await snap.read(0, 10), filled(10, 1))
  const again = new Snapshot({ name: 's', store: new PersistentStore(cowBase.clone(), { chunkBytes: 4 * KiB }), overflow: true })
  await setup(64 * KiB).origin.addSnapshot(again)
  assert.equal(again.statusText(), `${3 * 8}/24 16`)
})

test('invariant 25: status precedence Invalid > Merge failed > Overflow > usage', async () => {
  const { origin } = setup(64 * KiB)
  const { snap } = persistent('s', 4 * KiB, 12 * KiB, { overflow: true })
  await origin.addSnapshot(snap)
  assert.equal(snap.statusText(), '16/24 16')
  await snap.write(filled(10, 1), 0)
  await rejectsCode(snap.write(filled(10, 1), 8 * KiB), 'SNAP_OVERFLOW')
  assert.equal(snap.statusText(), 'Overflow')
  snap.markMergeFailed()
  assert.equal(snap.statusText(), 'Merge failed')
  await snap.invalidate('test')
  assert.equal(snap.statusText(), 'Invalid')
})

test('invariant 27: a transient snapshot uses COW chunk 0 first and counts c per exception', async () => {
  const { origin, originBase } = setup(32 * KiB)
  const before = originBase.readSync(0, 4 * KiB)
  const cow = new MemoryDevice(64 * KiB)
  const snap = new Snapshot({ name: 'n', store: new TransientStore(cow, { chunkBytes: 4 * KiB }) })
  await origin.addSnapshot(snap)
  assert.equal(snap.statusText(), '0/128 0')
  await origin.write(filled(1, 1), 0)
  assert.deepEqual(cow.readSync(0, 4 * KiB), before)
  assert.equal(snap.statusText(), '8/128 0')
})

test('invariant 28: an invalid snapshot stays invalid, in memory and after reopening', async () => {
  const { origin, originDev } = setup(16 * KiB)
  const { snap, cowBase } = persistent('s', 4 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  originDev.failReads(1)
  await origin.write(filled(1, 1), 0)
  assert.equal(snap.valid, false)
  await origin.write(filled(1, 1), 8 * KiB)
  assert.equal(snap.valid, false)
  const again = new Snapshot({ name: 's', store: new PersistentStore(cowBase.clone(), { chunkBytes: 4 * KiB }) })
  await setup(16 * KiB).origin.addSnapshot(again)
  assert.equal(again.statusText(), 'Invalid')
})

test('invariant 29: a whole-chunk snapshot write reads nothing from the origin and waits for the commit', async () => {
  const { origin, originDev } = setup(64 * KiB)
  const { snap, cow } = persistent('s', 4 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  let originReads = 0
  let cowFlushes = 0
  originDev.setDelay((op) => {
    if (op === 'read') originReads++
    return 0
  })
  cow.setDelay((op) => {
    if (op === 'flush') cowFlushes++
    return 0
  })
  await snap.write(filled(4 * KiB, 6), 8 * KiB)
  assert.equal(originReads, 0)
  assert.ok(cowFlushes >= 1, 'the exception must be committed (flushed) before the write completes')
  assert.deepEqual(await snap.read(8 * KiB, 4 * KiB), filled(4 * KiB, 6))
})

test('invariant 30: a partial snapshot write keeps the old origin data around it', async () => {
  const { origin, originBase } = setup(64 * KiB)
  const before = originBase.readSync(0, 64 * KiB)
  const { snap } = persistent('s', 16 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  await snap.write(filled(100, 0xee), 16 * KiB + 50)
  await origin.write(filled(16 * KiB, 0), 16 * KiB)
  const expected = before.slice(16 * KiB, 32 * KiB)
  expected.fill(0xee, 50, 150)
  assert.deepEqual(await snap.read(16 * KiB, 16 * KiB), expected)
})

test('invariant 31: a slow snapshot read racing an origin write to the same chunk returns the old data', async () => {
  const { origin, originBase, originDev } = setup(16 * KiB)
  const before = originBase.readSync(0, 4 * KiB)
  const { snap } = persistent('s', 4 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  let slowOnce = true
  originDev.setDelay((op) => {
    if (op === 'read' && slowOnce) {
      slowOnce = false
      return 40 // the snapshot's fall-through read
    }
    return 0
  })
  const read = snap.read(0, 4 * KiB)
  const write = origin.write(filled(4 * KiB, 0x77), 0)
  assert.deepEqual(await read, before)
  await write
  assert.deepEqual(await snap.read(0, 4 * KiB), before)
})

test('invariant 32: flush on an invalid snapshot succeeds', async () => {
  const { origin } = setup(16 * KiB)
  const { snap } = persistent('s', 4 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  await snap.invalidate('test')
  await snap.flush()
})

test('invariant 33: discard_zeroes_cow zeroes whole saved chunks, ignores unsaved ones; passdown discards the origin', async () => {
  const { origin, originBase } = setup(64 * KiB)
  const before = originBase.readSync(0, 64 * KiB)
  const { snap } = persistent('s', 4 * KiB, 256 * KiB, { discard: true })
  await origin.addSnapshot(snap)
  await snap.write(filled(4 * KiB, 1), 0)
  await snap.discard(0, 4 * KiB)
  assert.deepEqual(await snap.read(0, 4 * KiB), filled(4 * KiB, 0))
  await snap.discard(8 * KiB, 4 * KiB)
  assert.equal(snap.table.size, 1, 'no exception is created for an unsaved chunk')
  assert.deepEqual(await snap.read(8 * KiB, 4 * KiB), before.subarray(8 * KiB, 12 * KiB))

  const second = setup(64 * KiB)
  const pd = persistent('p', 4 * KiB, 256 * KiB, { discard: true, passdown: true }).snap
  await second.origin.addSnapshot(pd)
  await pd.discard(16 * KiB, 4 * KiB)
  assert.deepEqual(await second.origin.read(16 * KiB, 4 * KiB), filled(4 * KiB, 0))
  assert.equal(pd.table.size, 0)
  const plain = persistent('x', 4 * KiB, 256 * KiB).snap
  await rejectsCode(plain.discard(0, 512), 'SNAP_NOT_SUPPORTED')
})

test('invariant 34: with more than COW_THRESHOLD copies in flight new origin writes wait', async () => {
  const { origin, originDev } = setup(4 * KiB * (COW_THRESHOLD + 50))
  const { snap } = persistent('s', 4 * KiB, 4 * KiB * (COW_THRESHOLD + 200))
  await origin.addSnapshot(snap)
  let release!: () => void
  const gate = new Promise<void>((resolve) => (release = resolve))
  // Copies in flight each time a copy starts (its read of the origin), over the whole test.
  let maxInFlight = 0
  let copiesStarted = 0
  originDev.setDelay((op) => {
    if (op === 'read') {
      copiesStarted++
      maxInFlight = Math.max(maxInFlight, snap.copiesInFlight)
    }
    return 0
  })
  // Hold every copy until released, then check the threshold was respected.
  const holdReads = originDev.next.readInto.bind(originDev.next)
  ;(originDev.next as MemoryDevice).readInto = async (t: Uint8Array, o: number) => {
    await gate
    return holdReads(t, o)
  }
  let writesDone = 0
  const writes = Array.from({ length: COW_THRESHOLD + 20 }, (_, c) => origin.write(filled(1, 1), c * 4 * KiB).then(() => writesDone++))
  // Every copy waits at the gate, so the engine is idle after a few turns of the event loop.
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r))
  // A write starts its copy while at most COW_THRESHOLD are in flight: the threshold + 1 copies
  // run, the other 19 writes wait for one to finish.
  assert.equal(snap.copiesInFlight, COW_THRESHOLD + 1, 'copies in flight while held')
  assert.equal(copiesStarted, COW_THRESHOLD + 1, 'copies started while held')
  assert.equal(writesDone, 0)
  release()
  await Promise.all(writes)
  assert.equal(copiesStarted, COW_THRESHOLD + 20)
  assert.equal(maxInFlight, COW_THRESHOLD + 1, 'the waiting writes never pushed the copies in flight past the threshold + 1')
  assert.equal(snap.table.size, COW_THRESHOLD + 20)
})

test('live creation: a snapshot taken under load is an exact point in time', async () => {
  const { origin, originBase } = setup(256 * KiB)
  const original = originBase.readSync(0, 256 * KiB)
  const random = new Random(7)
  // Writes to the second half are held at the device until the snapshot creation has begun, so
  // there are writes on both sides of the point in time whatever the machine's load.
  let release!: () => void
  const gate = new Promise<void>((resolve) => (release = resolve))
  const baseWrite = originBase.write.bind(originBase)
  originBase.write = async (data: Uint8Array, offset: number, options?: { fua?: boolean }) => {
    if (offset >= 128 * KiB) await gate
    return baseWrite(data, offset, options)
  }
  const writes: Array<{ offset: number; data: Uint8Array; done: boolean; promise: Promise<void> }> = []
  for (let i = 0; i < 30; i++) {
    // Each write stays inside its own 8 KiB slot: overlapping concurrent writes have no defined result.
    const offset = i * 8 * KiB + random.int(2000)
    const data = random.bytes(3000 + random.int(3000))
    const w = { offset, data, done: false, promise: Promise.resolve() }
    w.promise = origin.write(data, offset).then(() => {
      w.done = true
    })
    writes.push(w)
  }
  await Promise.all(writes.filter((w) => w.offset < 128 * KiB).map((w) => w.promise))
  const completedBefore = writes.filter((w) => w.done)
  const { snap } = persistent('live', 4 * KiB, 4096 * KiB)
  const creation = origin.addSnapshot(snap)
  release()
  await creation
  const later = { offset: 0, data: filled(3000, 0x42) }
  await Promise.all([...writes.map((w) => w.promise), origin.write(later.data, later.offset)])
  // Completed before: in. In flight: wholly in or wholly out. Started after: out.
  for (const w of completedBefore) assert.deepEqual(await snap.read(w.offset, w.data.length), w.data)
  for (const w of writes) {
    const seen = await snap.read(w.offset, w.data.length)
    const old = original.subarray(w.offset, w.offset + w.data.length)
    assert.ok(
      Buffer.from(seen).equals(Buffer.from(w.data)) || Buffer.from(seen).equals(Buffer.from(old)),
      `write at ${w.offset} is torn in the snapshot`,
    )
  }
  assert.ok(completedBefore.length > 0 && completedBefore.length < writes.length, 'the test needs writes on both sides')
  assert.notDeepEqual(await snap.read(0, 3000), later.data)
})

test('errors: out-of-range and closed operations carry stable codes', async () => {
  const { origin } = setup(16 * KiB)
  const { snap } = persistent('s', 4 * KiB, 256 * KiB)
  await origin.addSnapshot(snap)
  await rejectsCode(origin.write(filled(2, 1), 16 * KiB - 1), 'SNAP_OUT_OF_RANGE')
  await rejectsCode(snap.read(16 * KiB, 1), 'SNAP_OUT_OF_RANGE')
  await origin.close()
  await rejectsCode(origin.read(0, 1), 'SNAP_CLOSED')
  await rejectsCode(snap.read(0, 1), 'SNAP_CLOSED')
})
