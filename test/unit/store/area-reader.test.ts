/**
 * AreaReader: blocking reads while they are fast, asynchronous read-ahead once a batch is slow
 * or the device has no blocking read; the images are the device's bytes either way. Time is a
 * fake clock the test device advances, so no verdict depends on the machine's speed.
 */
import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { BaseBlockDevice, type DeviceCapabilities } from '../../../src/device/block-device.js'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import { isSnapError, SnapError } from '../../../src/errors.js'
import { areaChunk, layoutFor } from '../../../src/format/layout.js'
import { AreaReader, SLOW_READ_MS } from '../../../src/store/area-reader.js'

const CHUNK = 4096
const layout = layoutFor(CHUNK)

/** Bytes whose every area chunk starts with its area number, so a wrong image shows. */
function cowBytes(areas: number): Uint8Array {
  const bytes = new Uint8Array((areaChunk(layout, areas - 1) + 1) * CHUNK)
  for (let a = 0; a < areas; a++) {
    const at = areaChunk(layout, a) * CHUNK
    new DataView(bytes.buffer).setUint32(at, a + 1, true)
    bytes[at + CHUNK - 1] = (a * 7) & 0xff
  }
  return bytes
}

/** A device with blocking reads that each cost `msPerRead(n)` on the fake clock (n: reads so far). */
class ClockedDevice extends BaseBlockDevice {
  readonly capabilities: DeviceCapabilities = { writable: false, flush: false, fua: false, discard: false, resize: false }
  clockMs = 0
  blockingReads = 0
  asyncReads = 0
  private readonly bytes: Uint8Array
  private readonly msPerRead: (n: number) => number
  private readonly failBlockingAt: number | null

  constructor(bytes: Uint8Array, msPerRead: (n: number) => number, failBlockingAt: number | null = null) {
    super(bytes.length, 'clocked')
    this.bytes = bytes
    this.msPerRead = msPerRead
    this.failBlockingAt = failBlockingAt
  }

  protected override _readIntoNow(target: Uint8Array, offset: number): boolean {
    if (offset === this.failBlockingAt) throw new SnapError('SNAP_IO', 'injected read error')
    this.clockMs += this.msPerRead(this.blockingReads++)
    target.set(this.bytes.subarray(offset, offset + target.length))
    return true
  }

  protected override async _readInto(target: Uint8Array, offset: number): Promise<void> {
    this.asyncReads++
    await new Promise<void>((resolve) => setImmediate(resolve))
    target.set(this.bytes.subarray(offset, offset + target.length))
  }

  protected override _write(): Promise<void> {
    return Promise.reject(new Error('read-only'))
  }

  protected override _flush(): Promise<void> {
    return Promise.resolve()
  }
}

function readerFor(cow: ClockedDevice | MemoryDevice, endArea?: number) {
  const issued: number[] = []
  const reader = new AreaReader({
    cow,
    layout,
    cowChunks: Math.floor(cow.sizeBytes / CHUNK),
    read: (offset, length) => {
      issued.push((offset / CHUNK - 1) / layout.stride)
      return cow.read(offset, length)
    },
    describeError: (err, offset) => new SnapError('SNAP_CORRUPT_METADATA', `reading COW metadata at ${offset}: ${(err as Error).message}`),
    ...(endArea === undefined ? {} : { endArea }),
    now: () => (cow instanceof ClockedDevice ? cow.clockMs : 0),
  })
  return { reader, issued }
}

async function readAll(reader: AreaReader, from: number, to: number): Promise<Uint8Array[]> {
  const images: Uint8Array[] = []
  for (let a = from; a < to; a++) images.push(await reader.next(a))
  return images
}

function assertImages(images: Uint8Array[], from: number, bytes: Uint8Array): void {
  images.forEach((image, i) => {
    const at = areaChunk(layout, from + i) * CHUNK
    assert.deepEqual(image, bytes.subarray(at, at + CHUNK), `area ${from + i}`)
  })
}

describe('AreaReader', () => {
  it('reads every area with a blocking read while reads stay fast', async () => {
    const bytes = cowBytes(200)
    const cow = new ClockedDevice(bytes, () => SLOW_READ_MS / 4)
    const { reader, issued } = readerFor(cow)
    const images = await readAll(reader, 0, 200)
    await reader.settle()
    assertImages(images, 0, bytes)
    assert.equal(cow.blockingReads, 200)
    assert.deepEqual(issued, [])
    assert.equal(reader.readsBlocking, true)
  })

  it('goes asynchronous after a slow first batch: two blocking reads at most on a cold device', async () => {
    const bytes = cowBytes(100)
    const cow = new ClockedDevice(bytes, () => SLOW_READ_MS * 10)
    const { reader, issued } = readerFor(cow)
    const images = await readAll(reader, 0, 100)
    await reader.settle()
    assertImages(images, 0, bytes)
    assert.equal(cow.blockingReads, 2)
    assert.equal(reader.readsBlocking, false)
    // Each area from the third on was read once, in order, 16 ahead at most and never past the device.
    assert.deepEqual(issued, Array.from({ length: 98 }, (_, i) => i + 2))
  })

  it('goes asynchronous at the first slow batch after fast ones', async () => {
    const bytes = cowBytes(300)
    // Reads turn slow from the 67th (the first two batches: 2 + 64 fast areas).
    const cow = new ClockedDevice(bytes, (n) => (n < 66 ? SLOW_READ_MS / 4 : SLOW_READ_MS * 10))
    const { reader } = readerFor(cow)
    const images = await readAll(reader, 0, 300)
    await reader.settle()
    assertImages(images, 0, bytes)
    assert.equal(cow.blockingReads, 2 + 64 + 64)
    assert.equal(cow.asyncReads, 300 - 130)
  })

  it('reads a device with no blocking read asynchronously, never ahead of endArea', async () => {
    const bytes = cowBytes(40)
    const cow = MemoryDevice.fromBytes(bytes)
    const { reader, issued } = readerFor(cow, 25)
    const images = await readAll(reader, 10, 25)
    await reader.settle()
    assertImages(images, 10, bytes)
    assert.deepEqual(issued, Array.from({ length: 15 }, (_, i) => i + 10))
  })

  it('skipped areas are not handed out: after a gap the next image is the asked-for area', async () => {
    const bytes = cowBytes(60)
    const cow = MemoryDevice.fromBytes(bytes)
    const { reader } = readerFor(cow)
    const first = await reader.next(3)
    const later = await reader.next(9) // 4..8 were read ahead and are dropped
    const far = await reader.next(40) // beyond the read-ahead
    await reader.settle()
    assertImages([first], 3, bytes)
    assertImages([later], 9, bytes)
    assertImages([far], 40, bytes)
  })

  it('a failed blocking read is reported in the store\'s words', async () => {
    const bytes = cowBytes(10)
    const cow = new ClockedDevice(bytes, () => 0, areaChunk(layout, 1) * CHUNK)
    const { reader } = readerFor(cow)
    await reader.next(0)
    await assert.rejects(reader.next(1), (err: unknown) => isSnapError(err) && err.code === 'SNAP_CORRUPT_METADATA' && /reading COW metadata at 1056768: injected read error/.test(err.message))
  })
})
