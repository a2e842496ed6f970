/**
 * Found by npm run torture (power cuts, seed 2024, cases 17/95, 27/99, 62/294, 80/501): a
 * snapshot whose COW filled was marked invalid in memory at once, so a second origin write to
 * a chunk it never saved went to the origin device while the invalid header was still on its
 * way to the COW. A power cut in that window brought the snapshot back valid, showing the new
 * origin data as its point-in-time view. Origin writes must wait until the invalidation is
 * durable.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import { ExceptionEvents } from '../../../src/snapshot/exception-events.js'
import { Origin } from '../../../src/snapshot/origin.js'
import { Snapshot } from '../../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../../src/store/persistent-store.js'
import { type CompletionGate, FaultyDevice } from '../../support/faulty-device.js'

const CHUNK = 4096

/** Holds every operation until release() (operations admitted before hold() run freely). */
class HoldingGate implements CompletionGate {
  private holding = false
  private held: Array<() => void> = []
  hold(): void {
    this.holding = true
  }
  get waiting(): number {
    return this.held.length
  }
  release(): void {
    this.holding = false
    for (const go of this.held.splice(0)) go()
  }
  admit(): Promise<void> {
    if (!this.holding) return Promise.resolve()
    return new Promise((resolve) => this.held.push(resolve))
  }
}

const turns = async (n: number) => {
  for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve))
}

for (const writeBackBytes of [0, 1024 * 1024]) {
  test(`no origin write reaches the device before a full COW's invalidation is durable (write-back ${writeBackBytes})`, async () => {
    const originBase = MemoryDevice.fromBytes(new Uint8Array(4 * CHUNK).fill(1))
    const origin = new Origin(originBase, { events: new ExceptionEvents(), writeBackBytes })
    // Header and area 0 only: the first copy-out cannot get a chunk.
    const cowBase = new MemoryDevice(2 * CHUNK)
    const gate = new HoldingGate()
    const cow = new FaultyDevice(cowBase, 'cow')
    cow.setGate(gate)
    const snap = new Snapshot({ name: 'full', store: new PersistentStore(cow, { chunkBytes: CHUNK }) })
    await origin.addSnapshot(snap)
    gate.hold()
    const first = origin.write(new Uint8Array(100).fill(2), 0) // chunk 0: no room, invalidates
    await turns(5)
    assert.equal(snap.valid, false, 'invalid in memory at once')
    assert.ok(gate.waiting > 0, 'the invalid header write is held')
    const second = origin.write(new Uint8Array(100).fill(3), CHUNK) // chunk 1, never saved
    await turns(20)
    assert.equal(new DataView(cowBase.readSync(0, 8).buffer).getUint32(4, true), 1, 'header still says valid')
    assert.deepEqual([...originBase.readSync(CHUNK, 4)], [1, 1, 1, 1], 'the second write reached the origin before the invalidation was durable')
    gate.release()
    await Promise.all([first, second])
    await origin.flush()
    assert.equal(new DataView(cowBase.readSync(0, 8).buffer).getUint32(4, true), 0, 'header says invalid')
    assert.deepEqual([...originBase.readSync(CHUNK, 4)], [3, 3, 3, 3])
    await origin.close()
  })
}
