import { after, describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, rm, stat, truncate, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FileDevice } from '../../../src/device/file-device.js'
import { isSnapError } from '../../../src/errors.js'
import { MEMORY_PAGE_BYTES, MemoryDevice } from '../../../src/device/memory-device.js'
import { runBlockDeviceSuite, rejectsWith } from '../../conformance/block-device.suite.js'
import { CrashRecorder } from '../../support/crash-recorder.js'
import { FaultyDevice } from '../../support/faulty-device.js'
import { Random } from '../../support/random.js'

const dir = await mkdtemp(join(tmpdir(), 'blocksnap-devices-'))
after(() => rm(dir, { recursive: true, force: true }))
let fileCount = 0
const tempPath = () => join(dir, `device-${fileCount++}.img`)

runBlockDeviceSuite(
  'file-device',
  async (sizeBytes, options) => {
    const path = tempPath()
    if (!options?.readOnly) return FileDevice.open(path, { create: sizeBytes, resizable: true })
    await (await FileDevice.open(path, { create: sizeBytes })).close()
    return FileDevice.open(path, { readOnly: true })
  },
  { discard: true, resize: true, readOnly: true },
)

runBlockDeviceSuite('memory-device', async (sizeBytes, options) => new MemoryDevice(sizeBytes, options), {
  discard: true,
  resize: true,
  readOnly: true,
})

runBlockDeviceSuite(
  'faulty-device',
  async (sizeBytes, options) => {
    const device = new FaultyDevice(new MemoryDevice(sizeBytes, options))
    const random = new Random(sizeBytes)
    device.setDelay(() => random.int(3))
    return device
  },
  { discard: true, resize: true, readOnly: true },
)

runBlockDeviceSuite('recording-device', async (sizeBytes) => new CrashRecorder().device('d', new MemoryDevice(sizeBytes)), {
  discard: true,
  resize: true,
  readOnly: false,
})

describe('file-device', () => {
  it('file-device: opening a missing file rejects SNAP_NOT_FOUND', async () => {
    await rejectsWith(FileDevice.open(join(dir, 'missing.img')), 'SNAP_NOT_FOUND')
    await rejectsWith(FileDevice.open(join(dir, 'missing.img'), { readOnly: true }), 'SNAP_NOT_FOUND')
  })

  it('file-device: exclusive create over an existing file rejects SNAP_EXISTS and keeps it', async () => {
    const path = tempPath()
    await writeFile(path, 'precious')
    await rejectsWith(FileDevice.open(path, { create: 4096 }), 'SNAP_EXISTS')
    assert.equal((await stat(path)).size, 8)
  })

  it('file-device: size is the file size at open and data persists across reopen', async () => {
    const path = tempPath()
    const device = await FileDevice.open(path, { create: 10_000 })
    assert.equal((await stat(path)).size, 10_000)
    const data = new Random(10).bytes(777)
    await device.write(data, 9000, { fua: true })
    await device.close()
    const again = await FileDevice.open(path, { readOnly: true })
    assert.equal(again.sizeBytes, 10_000)
    assert.equal(again.capabilities.writable, false)
    assert.equal(again.capabilities.resize, false)
    assert.deepEqual(await again.read(9000, 777), data)
    await again.close()
  })

  it('file-device: resize is refused unless opened resizable', async () => {
    const device = await FileDevice.open(tempPath(), { create: 4096 })
    assert.equal(device.capabilities.resize, false)
    await rejectsWith(device.resize(8192), 'SNAP_NOT_SUPPORTED')
    await device.close()
  })

  it('file-device: resize changes the file size', async () => {
    const path = tempPath()
    const device = await FileDevice.open(path, { create: 4096, resizable: true })
    await device.resize(1 << 20)
    assert.equal((await stat(path)).size, 1 << 20)
    await device.close()
  })

  it('file-device: reads past a file shrunk behind its back return zeros', async () => {
    const path = tempPath()
    const device = await FileDevice.open(path, { create: 8192 })
    await device.write(new Uint8Array(8192).fill(3), 0)
    await truncate(path, 5000)
    const read = await device.read(4000, 4192)
    assert.ok(read.subarray(0, 1000).every((b) => b === 3))
    assert.ok(read.subarray(1000).every((b) => b === 0))
    await device.close()
  })

  it('file-device: a blocking read returns what the asynchronous one does, zeros past a shrunk end, and checks its range', async () => {
    const path = tempPath()
    const device = await FileDevice.open(path, { create: 8192 })
    const pattern = Uint8Array.from({ length: 8192 }, (_, i) => (i * 13) & 0xff)
    await device.write(pattern, 0)
    const now = new Uint8Array(3000)
    assert.equal(device.readIntoNow(now, 1234), true)
    assert.deepEqual(now, await device.read(1234, 3000))
    await truncate(path, 5000)
    const tail = new Uint8Array(4192).fill(9)
    assert.equal(device.readIntoNow(tail, 4000), true)
    assert.deepEqual(tail, await device.read(4000, 4192))
    assert.ok(tail.subarray(1000).every((b) => b === 0))
    assert.throws(() => device.readIntoNow(new Uint8Array(4096), 8000), (err: unknown) => isSnapError(err) && err.code === 'SNAP_OUT_OF_RANGE')
    await device.close()
    assert.throws(() => device.readIntoNow(new Uint8Array(1), 0), (err: unknown) => isSnapError(err) && err.code === 'SNAP_CLOSED')
  })

  it('memory-device: has no blocking read (callers fall back to the asynchronous one)', () => {
    assert.equal(new MemoryDevice(4096).readIntoNow(new Uint8Array(512), 0), false)
  })

  it('file-device: a discard reaching the end keeps the file size', async () => {
    const path = tempPath()
    const device = await FileDevice.open(path, { create: 3 << 20 })
    await device.write(new Uint8Array(3 << 20).fill(1), 0)
    await device.discard(1 << 20, 2 << 20)
    await device.discard(1000, 2_500_000)
    assert.equal((await stat(path)).size, 3 << 20)
    const all = await device.read(0, 3 << 20)
    assert.ok(all.subarray(0, 1000).every((b) => b === 1))
    assert.ok(all.subarray(1000).every((b) => b === 0))
    await device.close()
  })
})

describe('memory-device', () => {
  it('memory-device: unwritten ranges read as zeros and allocate nothing', async () => {
    const device = new MemoryDevice(1 << 30)
    assert.deepEqual(await device.read((1 << 30) - 100, 100), new Uint8Array(100))
    assert.equal(device.allocatedBytes, 0)
    await device.write(new Uint8Array(2).fill(1), MEMORY_PAGE_BYTES - 1)
    assert.equal(device.allocatedBytes, 2 * MEMORY_PAGE_BYTES)
  })

  it('memory-device: discard frees whole pages and zeroes partial ones', async () => {
    const device = new MemoryDevice(4 * MEMORY_PAGE_BYTES)
    await device.write(new Uint8Array(4 * MEMORY_PAGE_BYTES).fill(9), 0)
    await device.discard(100, 2 * MEMORY_PAGE_BYTES)
    assert.equal(device.allocatedBytes, 3 * MEMORY_PAGE_BYTES)
    const all = await device.read(0, 4 * MEMORY_PAGE_BYTES)
    assert.ok(all.subarray(0, 100).every((b) => b === 9))
    assert.ok(all.subarray(100, 100 + 2 * MEMORY_PAGE_BYTES).every((b) => b === 0))
    assert.ok(all.subarray(100 + 2 * MEMORY_PAGE_BYTES).every((b) => b === 9))
  })

  it('memory-device: clone is a deep copy', async () => {
    const device = new MemoryDevice(100_000)
    await device.write(new Uint8Array(10).fill(1), 50)
    const copy = device.clone()
    await copy.write(new Uint8Array(10).fill(2), 50)
    await device.write(new Uint8Array(10).fill(3), 99_000)
    assert.deepEqual(await device.read(50, 10), new Uint8Array(10).fill(1))
    assert.deepEqual(await copy.read(50, 10), new Uint8Array(10).fill(2))
    assert.deepEqual(await copy.read(99_000, 10), new Uint8Array(10))
    assert.equal(copy.sizeBytes, 100_000)
  })

  it('memory-device: fromBytes copies the bytes and leaves zero pages unallocated', async () => {
    const bytes = new Uint8Array(3 * MEMORY_PAGE_BYTES + 5)
    bytes[MEMORY_PAGE_BYTES + 7] = 42
    bytes[bytes.length - 1] = 43
    const device = MemoryDevice.fromBytes(bytes)
    assert.equal(device.sizeBytes, bytes.length)
    assert.equal(device.allocatedBytes, 2 * MEMORY_PAGE_BYTES)
    assert.deepEqual(await device.read(0, bytes.length), bytes)
    bytes[0] = 1
    assert.equal((await device.read(0, 1))[0], 0)
  })

  it('memory-device: shrinking frees pages beyond the new end', async () => {
    const device = new MemoryDevice(4 * MEMORY_PAGE_BYTES)
    await device.write(new Uint8Array(4 * MEMORY_PAGE_BYTES).fill(1), 0)
    await device.resize(MEMORY_PAGE_BYTES + 1)
    assert.equal(device.allocatedBytes, 2 * MEMORY_PAGE_BYTES)
  })
})

describe('faulty-device', () => {
  const filled = (n: number, v: number) => new Uint8Array(n).fill(v)

  it('faulty-device: reads overlapping a failed range reject SNAP_IO, others pass', async () => {
    const memory = new MemoryDevice(8192)
    await memory.write(filled(8192, 4), 0)
    const device = new FaultyDevice(memory)
    device.failReads({ offset: 4096, length: 512 })
    await rejectsWith(device.read(4000, 100), 'SNAP_IO')
    await rejectsWith(device.read(4607, 1), 'SNAP_IO')
    assert.deepEqual(await device.read(4608, 100), filled(100, 4))
    assert.deepEqual(await device.read(0, 4096), filled(4096, 4))
    assert.equal(device.injected, 2)
    device.clearFaults()
    assert.deepEqual(await device.read(4096, 512), filled(512, 4))
  })

  it('faulty-device: a count fails the next writes without touching the wrapped device', async () => {
    const memory = new MemoryDevice(8192)
    const device = new FaultyDevice(memory)
    device.failWrites(2)
    await rejectsWith(device.write(filled(10, 1), 0), 'SNAP_IO')
    await rejectsWith(device.write(filled(10, 2), 100, { fua: true }), 'SNAP_IO')
    assert.deepEqual(await memory.read(0, 200), new Uint8Array(200))
    await device.write(filled(10, 3), 0)
    assert.deepEqual(await memory.read(0, 10), filled(10, 3))
  })

  it('faulty-device: predicates, flush and discard faults reject SNAP_IO', async () => {
    const memory = new MemoryDevice(8192)
    await memory.write(filled(8192, 6), 0)
    const device = new FaultyDevice(memory)
    device.failWrites((offset) => offset >= 4096)
    device.failFlushes()
    device.failDiscards(1)
    await rejectsWith(device.write(filled(1, 1), 5000), 'SNAP_IO')
    await device.write(filled(1, 1), 10)
    await rejectsWith(device.flush(), 'SNAP_IO')
    await rejectsWith(device.flush(), 'SNAP_IO')
    await rejectsWith(device.discard(0, 512), 'SNAP_IO')
    assert.deepEqual(await memory.read(0, 512), filled(512, 6).fill(1, 10, 11))
    await device.discard(0, 512)
    assert.deepEqual(await memory.read(0, 512), new Uint8Array(512))
    device.clearFaults()
    await device.flush()
  })

  it('faulty-device: delays let later operations complete first', async () => {
    const device = new FaultyDevice(new MemoryDevice(8192))
    device.setDelay((_op, offset) => (offset === 0 ? 30 : 0))
    const order: number[] = []
    await Promise.all([0, 512, 1024].map((offset) => device.write(filled(1, 1), offset).then(() => order.push(offset))))
    assert.equal(order[order.length - 1], 0)
  })

  it('faulty-device: resize delegates to the wrapped device', async () => {
    const memory = new MemoryDevice(8192)
    const device = new FaultyDevice(memory)
    await device.resize(16384)
    assert.equal(device.sizeBytes, 16384)
    assert.equal(memory.sizeBytes, 16384)
  })
})

describe('crash-recorder', () => {
  const filled = (n: number, v: number) => new Uint8Array(n).fill(v)
  const image = (images: Map<string, MemoryDevice>, name: string) => {
    const found = images.get(name)
    assert.ok(found)
    return found
  }

  it('crash-recorder: writes before a flush survive every later cut', async () => {
    const recorder = new CrashRecorder()
    const device = recorder.device('a', new MemoryDevice(8192))
    await device.write(filled(512, 1), 0)
    await device.write(filled(100, 2), 1000)
    await device.flush()
    const flushedAt = recorder.length
    await device.write(filled(512, 3), 4096)
    await device.flush()
    await device.write(filled(512, 4), 0)
    assert.deepEqual(recorder.flushIndices(), [2, 4])
    for (let cut = flushedAt; cut <= recorder.length; cut++) {
      for (const unflushed of ['drop', 'keep', 'random'] as const) {
        const a = image(recorder.imagesAt(cut, { unflushed, seed: cut }), 'a')
        assert.deepEqual(await a.read(1000, 100), filled(100, 2))
      }
    }
    const before = image(recorder.imagesAt(flushedAt - 1), 'a')
    assert.deepEqual(await before.read(0, 8192), new Uint8Array(8192))
  })

  it('crash-recorder: unflushed writes are dropped with drop and present with keep', async () => {
    const base = new MemoryDevice(8192)
    await base.write(filled(10, 9), 8000)
    const recorder = new CrashRecorder()
    const device = recorder.device('a', base)
    await device.write(filled(512, 1), 0)
    await device.flush()
    await device.write(filled(512, 2), 512)
    await device.discard(0, 100)
    const dropped = image(recorder.imagesAt(recorder.length), 'a')
    assert.deepEqual(await dropped.read(0, 1024), filled(1024, 0).fill(1, 0, 512))
    assert.deepEqual(await dropped.read(8000, 10), filled(10, 9))
    const kept = image(recorder.imagesAt(recorder.length, { unflushed: 'keep' }), 'a')
    assert.deepEqual(await kept.read(0, 1024), await base.read(0, 1024))
    assert.equal(recorder.events()[3]?.kind, 'discard')
  })

  it('crash-recorder: random keeps a seeded subset', async () => {
    const recorder = new CrashRecorder()
    const device = recorder.device('a', new MemoryDevice(64 * 512))
    for (let i = 0; i < 64; i++) await device.write(filled(512, 1), i * 512)
    const read = async (seed: number) => image(recorder.imagesAt(recorder.length, { unflushed: 'random', seed }), 'a').read(0, 64 * 512)
    const first = await read(7)
    assert.deepEqual(await read(7), first)
    const sectors = Array.from({ length: 64 }, (_, i) => first[i * 512])
    assert.ok(sectors.includes(0) && sectors.includes(1))
  })

  it('crash-recorder: tear applies a strict sector prefix of the last unflushed write', async () => {
    const recorder = new CrashRecorder()
    const device = recorder.device('a', new MemoryDevice(16 * 512))
    await device.write(filled(8 * 512, 1), 0)
    await device.flush()
    await device.write(filled(8 * 512 - 100, 2), 1100)
    const seen = new Set<number>()
    for (let seed = 0; seed < 40; seed++) {
      const torn = await image(recorder.imagesAt(recorder.length, { unflushed: 'keep', tear: true, seed }), 'a').read(0, 16 * 512)
      const written = torn.subarray(1100, 1100 + 8 * 512 - 100)
      const applied = written.findIndex((b) => b !== 2)
      assert.ok(applied >= 0, 'a torn write never lands whole')
      assert.ok(written.subarray(applied).every((b, i) => b === (1100 + applied + i < 8 * 512 ? 1 : 0)))
      // The torn edge falls on a device sector boundary (or at the very start of the write).
      assert.ok(applied === 0 || (1100 + applied) % 512 === 0)
      seen.add(applied)
    }
    assert.ok(seen.size > 1)
  })

  it('crash-recorder: two devices on one timeline each honour only their own flushes', async () => {
    const recorder = new CrashRecorder()
    const a = recorder.device('a', new MemoryDevice(4096))
    const b = recorder.device('b', new MemoryDevice(4096))
    await a.write(filled(512, 1), 0)
    await b.write(filled(512, 2), 0)
    await a.flush()
    await b.write(filled(512, 3), 512)
    await a.write(filled(512, 4), 512)
    await b.flush()
    await a.write(filled(512, 5), 1024)
    const cutAfterAFlush = 3
    let images = recorder.imagesAt(cutAfterAFlush)
    assert.deepEqual(await image(images, 'a').read(0, 512), filled(512, 1))
    assert.deepEqual(await image(images, 'b').read(0, 512), new Uint8Array(512))
    images = recorder.imagesAt(recorder.length)
    assert.deepEqual(await image(images, 'a').read(0, 1536), filled(1536, 0).fill(1, 0, 512))
    assert.deepEqual(await image(images, 'b').read(0, 1024), filled(1024, 2).fill(3, 512))
  })

  it('crash-recorder: a FUA write is durable immediately', async () => {
    const recorder = new CrashRecorder()
    const device = recorder.device('a', new MemoryDevice(4096))
    await device.write(filled(512, 1), 0)
    await device.write(filled(512, 2), 512, { fua: true })
    assert.deepEqual(recorder.events().map((e) => e.kind), ['write', 'write', 'flush'])
    const a = image(recorder.imagesAt(recorder.length), 'a')
    assert.deepEqual(await a.read(0, 1024), filled(1024, 1).fill(2, 512))
  })

  it('crash-recorder: a resize is durable only after a flush', async () => {
    const recorder = new CrashRecorder()
    const device = recorder.device('a', new MemoryDevice(4096))
    await device.resize(8192)
    await device.write(filled(512, 1), 6000)
    assert.equal(image(recorder.imagesAt(recorder.length), 'a').sizeBytes, 4096)
    const random = image(recorder.imagesAt(recorder.length, { unflushed: 'random', seed: 3 }), 'a')
    assert.ok(random.sizeBytes === 4096 || random.sizeBytes === 8192)
    await device.flush()
    const a = image(recorder.imagesAt(recorder.length), 'a')
    assert.equal(a.sizeBytes, 8192)
    assert.deepEqual(await a.read(6000, 512), filled(512, 1))
  })
})

describe('random', () => {
  it('random: the same seed gives the same sequence', () => {
    const a = new Random(42)
    const b = new Random(42)
    for (let i = 0; i < 100; i++) assert.equal(a.next(), b.next())
    assert.deepEqual(a.bytes(37), b.bytes(37))
    assert.notDeepEqual(new Random(1).bytes(16), new Random(2).bytes(16))
  })

  it('random: values stay in range', () => {
    const random = new Random(5)
    for (let i = 0; i < 1000; i++) {
      const x = random.next()
      assert.ok(x >= 0 && x < 1)
      const n = random.int(7)
      assert.ok(Number.isInteger(n) && n >= 0 && n < 7)
    }
    assert.equal(random.pick(['only']), 'only')
    assert.equal(random.chance(0), false)
    assert.equal(random.chance(1), true)
  })
})
