/**
 * The copy engine against a byte-array model, with the completion order of every device
 * operation decided by a seeded Scheduler and random read/write failures.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import { CopyEngine, CopyFailure, type CopyTarget } from '../../../src/snapshot/copy-engine.js'
import { FaultyDevice } from '../../support/faulty-device.js'
import { Random, streamSeed } from '../../support/random.js'
import { Scheduler } from '../../support/scheduler.js'

const SOURCE_BYTES = 256 * 1024
const DEST_BYTES = 512 * 1024

test('copyOut: every target reports once; a success put exactly its source bytes there, a failure names its stage', async () => {
  for (const seed of [1, 2, 3, 4, 5, 6]) {
    const random = new Random(streamSeed(seed, 'ops'))
    const scheduler = new Scheduler(seed)
    const sourceBytes = random.bytes(SOURCE_BYTES)
    const source = new FaultyDevice(MemoryDevice.fromBytes(sourceBytes), 'source')
    source.setGate(scheduler)
    const bases = [0, 1, 2].map(() => new MemoryDevice(DEST_BYTES))
    const dests = bases.map((base, i) => {
      const d = new FaultyDevice(base, `dest${i}`)
      d.setGate(scheduler)
      return d
    })
    const model = bases.map(() => new Uint8Array(DEST_BYTES))
    // Each destination chunk of 4 KiB is written at most once (as the COW allocator guarantees).
    const nextFree = [0, 0, 0]
    const outcomes: Array<Promise<void>> = []
    const problems: string[] = []
    const faultyDests = new Set<number>()
    const engine = new CopyEngine()
    for (let job = 0; job < 40; job++) {
      const readFails = random.chance(0.1)
      if (readFails) source.failReads(1)
      const span = 4096 * (1 + random.int(16))
      const start = 4096 * random.int((SOURCE_BYTES - span) / 4096 + 1)
      const targets: CopyTarget[] = []
      for (let d = 0; d < dests.length; d++) {
        if (!random.chance(0.7)) continue
        const from = start + 4096 * random.int(span / 4096)
        const length = Math.min(start + span - from, 4096 * (1 + random.int(4)))
        if (nextFree[d]! + length > DEST_BYTES) continue
        const to = nextFree[d]!
        nextFree[d]! += length
        const writeFails = random.chance(0.1)
        const prepareFails = random.chance(0.05)
        if (writeFails) {
          dests[d]!.failWrites({ offset: to, length })
          faultyDests.add(d)
        }
        let calls = 0
        outcomes.push(
          new Promise<void>((resolve) => {
            targets.push({
              from,
              length,
              device: dests[d]!,
              to,
              before: prepareFails ? () => Promise.reject(new Error('no space')) : undefined,
              done: (failure) => {
                calls++
                const what = `seed ${seed} job ${job} dest ${d}`
                problems.push(...(calls === 1 ? [] : [`${what}: done called ${calls} times`]))
                let expected: string | null = null
                if (prepareFails) expected = 'prepare'
                else if (readFails) expected = 'read'
                else if (writeFails) expected = 'write'
                // Coalesced writes share their fate: a neighbour's injected fault may fail this one.
                const ok = (failure?.stage ?? null) === expected || (expected === null && failure?.stage === 'write' && faultyDests.has(d))
                if (!ok) problems.push(`${what}: outcome ${failure?.stage ?? 'ok'}, expected ${expected ?? 'ok'}`)
                if (failure !== null && !(failure instanceof CopyFailure)) problems.push(`${what}: not a CopyFailure`)
                if (failure === null) model[d]!.set(sourceBytes.subarray(from, from + length), to)
                resolve()
              },
            })
          }),
        )
      }
      if (targets.length === 0) source.clearFaults()
      engine.copyOut(source, targets)
      if (random.chance(0.3)) await new Promise((r) => setImmediate(r))
    }
    await Promise.all(outcomes)
    assert.deepEqual(problems, [])
    assert.equal(engine.inFlight, 0)
    for (let d = 0; d < dests.length; d++) {
      dests[d]!.clearFaults()
      // Failed writes never reached the base device; successful ones are exactly the model.
      assert.deepEqual(bases[d]!.readSync(0, DEST_BYTES), model[d], `seed ${seed}: dest ${d} bytes`)
    }
  }
})

test('copyRegions: copies every region, or fails with the first failure after every piece in flight settled', async () => {
  for (const seed of [1, 2, 3, 4, 5, 6, 7, 8]) {
    const random = new Random(streamSeed(seed, 'ops'))
    const scheduler = new Scheduler(seed)
    const sourceBytes = random.bytes(SOURCE_BYTES)
    const source = new FaultyDevice(MemoryDevice.fromBytes(sourceBytes), 'cow')
    source.setGate(scheduler)
    const initial = random.bytes(DEST_BYTES)
    const base = MemoryDevice.fromBytes(initial)
    const target = new FaultyDevice(base, 'origin')
    target.setGate(scheduler)
    // disjoint destination regions, random sources
    const regions = []
    for (let at = 0; at < DEST_BYTES - 64 * 1024; at += 4096 * (1 + random.int(30))) {
      const length = Math.min(4096 * (1 + random.int(12)), SOURCE_BYTES)
      if (at + length > DEST_BYTES) break
      regions.push({ from: 4096 * random.int((SOURCE_BYTES - length) / 4096 + 1), to: at, length })
      at += length
    }
    const fault = random.int(3) // 0 none, 1 a read fails, 2 a write fails
    if (fault === 1) source.failReads((o) => o >= 128 * 1024)
    if (fault === 2) target.failWrites((o) => o >= 256 * 1024)
    const engine = new CopyEngine()
    let inFlightAtEnd = -1
    const result = await engine
      .copyRegions(source, target, regions, { concurrency: 1 + random.int(8), pieceBytes: 4096 * (1 + random.int(8)) })
      .then(
        () => null,
        (err: unknown) => err,
      )
    inFlightAtEnd = engine.inFlight
    assert.equal(inFlightAtEnd, 0, `seed ${seed}: every piece settled before the result`)
    assert.equal(scheduler.waiting, 0, `seed ${seed}: no device operation left behind`)
    const got = base.readSync(0, DEST_BYTES)
    const expectedAll = initial.slice()
    for (const r of regions) expectedAll.set(sourceBytes.subarray(r.from, r.from + r.length), r.to)
    if (result === null) {
      assert.deepEqual(got, expectedAll, `seed ${seed}: all regions copied`)
      continue
    }
    assert.ok(result instanceof CopyFailure, `seed ${seed}: a CopyFailure`)
    assert.equal(result.stage, fault === 1 ? 'read' : 'write', `seed ${seed}: stage`)
    // Outside the regions nothing changed; inside, every byte is old or copied.
    for (let i = 0; i < DEST_BYTES; i++) {
      if (got[i] !== initial[i] && got[i] !== expectedAll[i]) assert.fail(`seed ${seed}: byte ${i} is neither old nor copied`)
    }
  }
})
