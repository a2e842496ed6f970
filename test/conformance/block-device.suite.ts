/**
 * The BlockDevice contract as a reusable suite: every implementation runs the same checks, so a
 * wrapper cannot quietly differ from the device it wraps.
 */
import { afterEach, describe, it } from 'node:test'
import assert from 'node:assert/strict'
import type { BlockDevice } from '../../src/device/block-device.js'
import type { SnapErrorCode } from '../../src/errors.js'
import { Random } from '../support/random.js'

export interface DeviceFactoryOptions {
  readonly readOnly?: boolean
}

export type DeviceFactory = (sizeBytes: number, options?: DeviceFactoryOptions) => Promise<BlockDevice>

export interface BlockDeviceTraits {
  readonly discard: boolean
  readonly resize: boolean
  /** The factory honours { readOnly: true } with a device whose contents are zeros. */
  readonly readOnly: boolean
  /** Size the factory is asked for, when the device cannot have the default (qemu-nbd serves whole sectors only). */
  readonly sizeBytes?: number
}

// Not a multiple of 512 or of 64 KiB, so edge handling in paged and sector-minded code is hit.
const DEFAULT_SIZE = 256 * 1024 + 1000

export async function rejectsWith(promise: Promise<unknown>, code: SnapErrorCode): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.equal((err as { code?: unknown }).code, code)
    return true
  })
}

export function runBlockDeviceSuite(name: string, factory: DeviceFactory, traits: BlockDeviceTraits): void {
  const SIZE = traits.sizeBytes ?? DEFAULT_SIZE
  describe(`${name}: BlockDevice conformance`, () => {
    const opened: BlockDevice[] = []
    const make = async (sizeBytes = SIZE, options?: DeviceFactoryOptions): Promise<BlockDevice> => {
      const device = await factory(sizeBytes, options)
      opened.push(device)
      return device
    }

    afterEach(async () => {
      await Promise.all(opened.splice(0).map((device) => device.close()))
    })

    it(`${name}: reports its size and a 512-byte block size`, async () => {
      const device = await make()
      assert.equal(device.sizeBytes, SIZE)
      assert.equal(device.blockSizeBytes, 512)
      assert.equal(device.closed, false)
    })

    it(`${name}: unwritten ranges read as zeros`, async () => {
      const device = await make()
      assert.deepEqual(await device.read(0, SIZE), new Uint8Array(SIZE))
      await device.write(new Uint8Array(100).fill(7), 70_000)
      const all = await device.read(0, SIZE)
      assert.ok(all.subarray(0, 70_000).every((b) => b === 0))
      assert.ok(all.subarray(70_100).every((b) => b === 0))
    })

    it(`${name}: reads return what was written at odd offsets and lengths`, async () => {
      const device = await make()
      const random = new Random(1)
      const model = new Uint8Array(SIZE)
      const spots: Array<[number, number]> = [
        [1, 1],
        [511, 2],
        [65_535, 3],
        [65_530, 70_000],
        [4097, 12_345],
        [SIZE - 7, 7],
        [0, 513],
      ]
      for (let i = 0; i < 20; i++) {
        const length = 1 + random.int(5000)
        spots.push([random.int(SIZE - length + 1), length])
      }
      for (const [offset, length] of spots) {
        const data = random.bytes(length)
        await device.write(data, offset)
        model.set(data, offset)
        assert.deepEqual(await device.read(offset, length), data)
      }
      assert.deepEqual(await device.read(0, SIZE), model)
      const target = new Uint8Array(9999)
      await device.readInto(target, 60_001)
      assert.deepEqual(target, model.subarray(60_001, 70_000))
    })

    it(`${name}: concurrent writes to disjoint ranges all land`, async () => {
      const device = await make()
      const random = new Random(2)
      const model = new Uint8Array(SIZE)
      const writes: Promise<void>[] = []
      for (let offset = 0; offset + 3000 <= SIZE; offset += 3001) {
        const data = random.bytes(3000)
        model.set(data, offset)
        writes.push(device.write(data, offset))
      }
      await Promise.all(writes)
      assert.deepEqual(await device.read(0, SIZE), model)
    })

    it(`${name}: once a write settles the caller may reuse its buffer`, async () => {
      const device = await make()
      const data = new Uint8Array(5000).fill(0x5a)
      await device.write(data, 1000)
      data.fill(0xa5)
      await device.flush()
      assert.deepEqual(await device.read(1000, 5000), new Uint8Array(5000).fill(0x5a))
    })

    it(`${name}: zero-length reads and writes inside the device succeed`, async () => {
      const device = await make()
      assert.equal((await device.read(SIZE, 0)).length, 0)
      await device.write(new Uint8Array(0), SIZE)
      await device.readInto(new Uint8Array(0), 0)
    })

    it(`${name}: out-of-range reads and writes reject SNAP_OUT_OF_RANGE and change nothing`, async () => {
      const device = await make()
      const data = new Random(3).bytes(4096)
      await device.write(data, SIZE - 4096)
      const before = await device.read(0, SIZE)
      await rejectsWith(device.read(SIZE - 1, 2), 'SNAP_OUT_OF_RANGE')
      await rejectsWith(device.read(SIZE + 1, 0), 'SNAP_OUT_OF_RANGE')
      await rejectsWith(device.read(-1, 1), 'SNAP_OUT_OF_RANGE')
      await rejectsWith(device.read(0.5, 1), 'SNAP_OUT_OF_RANGE')
      await rejectsWith(device.readInto(new Uint8Array(2), SIZE - 1), 'SNAP_OUT_OF_RANGE')
      await rejectsWith(device.write(new Uint8Array(2).fill(9), SIZE - 1), 'SNAP_OUT_OF_RANGE')
      await rejectsWith(device.write(new Uint8Array(1).fill(9), SIZE), 'SNAP_OUT_OF_RANGE')
      await rejectsWith(device.write(new Uint8Array(1).fill(9), -1), 'SNAP_OUT_OF_RANGE')
      await rejectsWith(device.write(new Uint8Array(1).fill(9), 2 ** 53), 'SNAP_OUT_OF_RANGE')
      if (device.capabilities.discard) {
        await rejectsWith(device.discard(SIZE - 10, 11), 'SNAP_OUT_OF_RANGE')
      }
      assert.equal(device.sizeBytes, SIZE)
      assert.deepEqual(await device.read(0, SIZE), before)
    })

    it(`${name}: flush and FUA writes resolve and keep the data readable`, async () => {
      const device = await make()
      assert.equal(device.capabilities.flush, true)
      assert.equal(device.capabilities.fua, true)
      const data = new Random(4).bytes(1500)
      await device.write(data, 300, { fua: true })
      await device.flush()
      await device.write(new Uint8Array(0), 0, { fua: true })
      assert.deepEqual(await device.read(300, 1500), data)
    })

    it(`${name}: operations after close reject SNAP_CLOSED and close is idempotent`, async () => {
      const device = await make()
      await device.write(new Uint8Array(10).fill(1), 0)
      await device.close()
      assert.equal(device.closed, true)
      await device.close()
      await Promise.all([device.close(), device.close()])
      await rejectsWith(device.read(0, 1), 'SNAP_CLOSED')
      await rejectsWith(device.readInto(new Uint8Array(1), 0), 'SNAP_CLOSED')
      await rejectsWith(device.write(new Uint8Array(1), 0), 'SNAP_CLOSED')
      await rejectsWith(device.flush(), 'SNAP_CLOSED')
      await rejectsWith(device.discard(0, 1), 'SNAP_CLOSED')
      await rejectsWith(device.resize(SIZE), 'SNAP_CLOSED')
    })

    it(`${name}: a read-only device rejects writes with SNAP_READ_ONLY`, { skip: !traits.readOnly }, async () => {
      const device = await make(SIZE, { readOnly: true })
      assert.equal(device.capabilities.writable, false)
      await rejectsWith(device.write(new Uint8Array(1).fill(1), 0), 'SNAP_READ_ONLY')
      await rejectsWith(device.write(new Uint8Array(1).fill(1), 0, { fua: true }), 'SNAP_READ_ONLY')
      await rejectsWith(device.discard(0, 512), 'SNAP_READ_ONLY')
      assert.deepEqual(await device.read(0, 4096), new Uint8Array(4096))
      await device.flush()
    })

    it(`${name}: discard makes the range read as zeros and leaves the rest`, { skip: !traits.discard }, async () => {
      const device = await make()
      assert.equal(device.capabilities.discard, true)
      const model = new Random(5).bytes(SIZE)
      await device.write(model, 0)
      const ranges: Array<[number, number]> = [
        [3, 1],
        [1000, 70_000],
        [131_072, 65_536],
        [SIZE - 2000, 2000],
      ]
      for (const [offset, length] of ranges) {
        await device.discard(offset, length)
        model.fill(0, offset, offset + length)
      }
      await device.discard(0, 0)
      assert.equal(device.sizeBytes, SIZE)
      assert.deepEqual(await device.read(0, SIZE), model)
    })

    it(`${name}: discard rejects SNAP_NOT_SUPPORTED when unsupported`, { skip: traits.discard }, async () => {
      const device = await make()
      await rejectsWith(device.discard(0, 512), 'SNAP_NOT_SUPPORTED')
    })

    it(`${name}: resize grows with zeros and shrinking drops the tail`, { skip: !traits.resize }, async () => {
      const device = await make()
      assert.equal(device.capabilities.resize, true)
      const model = new Random(6).bytes(SIZE)
      await device.write(model, 0)

      await device.resize(SIZE + 100_000)
      assert.equal(device.sizeBytes, SIZE + 100_000)
      assert.deepEqual(await device.read(0, SIZE), model)
      assert.deepEqual(await device.read(SIZE, 100_000), new Uint8Array(100_000))
      await device.write(new Uint8Array(10).fill(5), SIZE + 99_990)

      const small = 70_001
      await device.resize(small)
      assert.equal(device.sizeBytes, small)
      await rejectsWith(device.read(small, 1), 'SNAP_OUT_OF_RANGE')
      assert.deepEqual(await device.read(0, small), model.subarray(0, small))

      // Growing again must not bring the dropped bytes back.
      await device.resize(SIZE + 100_000)
      assert.deepEqual(await device.read(0, small), model.subarray(0, small))
      assert.deepEqual(await device.read(small, SIZE + 100_000 - small), new Uint8Array(SIZE + 100_000 - small))

      await device.resize(0)
      assert.equal(device.sizeBytes, 0)
      await rejectsWith(device.resize(-1), 'SNAP_OUT_OF_RANGE')
    })

    it(`${name}: resize rejects SNAP_NOT_SUPPORTED when unsupported`, { skip: traits.resize }, async () => {
      const device = await make()
      await rejectsWith(device.resize(SIZE * 2), 'SNAP_NOT_SUPPORTED')
      assert.equal(device.sizeBytes, SIZE)
    })
  })
}
