/**
 * copyRegions holds a bounded set of buffers: each worker reads every piece it copies into
 * the same buffer (a fresh buffer per piece made zeroing and garbage collection a third of a
 * sequential merge's main thread), and the bytes still land right under random completion
 * order.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import { CopyEngine } from '../../../src/snapshot/copy-engine.js'
import { FaultyDevice } from '../../support/faulty-device.js'
import { Random, streamSeed } from '../../support/random.js'
import { Scheduler } from '../../support/scheduler.js'

const KiB = 1024

/** Records the ArrayBuffer behind every read's target. */
class BufferSpy extends FaultyDevice {
  readonly buffers = new Set<ArrayBufferLike>()
  reads = 0

  protected override _readInto(target: Uint8Array, offset: number): Promise<void> {
    this.buffers.add(target.buffer)
    this.reads++
    return super._readInto(target, offset)
  }
}

test('copyRegions: every piece is read into one of at most `concurrency` buffers, and every region lands', async () => {
  for (const seed of [1, 2, 3, 4]) {
    const random = new Random(streamSeed(seed, 'buffers'))
    const scheduler = new Scheduler(seed)
    const sourceBytes = random.bytes(1024 * KiB)
    const source = new BufferSpy(MemoryDevice.fromBytes(sourceBytes), 'cow')
    source.setGate(scheduler)
    const base = MemoryDevice.fromBytes(random.bytes(1024 * KiB))
    const target = new FaultyDevice(base, 'origin')
    target.setGate(scheduler)
    const expected = base.readSync(0, base.sizeBytes)
    // 64 regions of 4-16 KiB, moved around, copied in pieces of 4 KiB by 3 workers.
    const regions = Array.from({ length: 64 }, (_, i) => ({ from: (63 - i) * 16 * KiB, to: i * 16 * KiB, length: 4 * KiB * (1 + random.int(4)) }))
    for (const r of regions) expected.set(sourceBytes.subarray(r.from, r.from + r.length), r.to)
    await new CopyEngine().copyRegions(source, target, regions, { concurrency: 3, pieceBytes: 4 * KiB })
    assert.ok(source.reads >= 64, `seed ${seed}: ${source.reads} pieces read`)
    assert.ok(source.buffers.size <= 3, `seed ${seed}: ${source.reads} pieces read into ${source.buffers.size} buffers`)
    assert.deepEqual(base.readSync(0, base.sizeBytes), expected, `seed ${seed}: origin bytes`)
  }
})
