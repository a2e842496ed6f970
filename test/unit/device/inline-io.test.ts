/**
 * InlineIo: reads and writes block while the file behaves like memory, and go to the thread pool
 * once one is slow or the process's block input count rises; FileDevice reads and writes the
 * file's bytes on either path. Time and the block count are fakes the tests advance, so no verdict
 * depends on the machine's speed or on what is in its page cache.
 */
import { after, describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, truncate } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  FIRST_BACKOFF_BYTES,
  INLINE_READ_MAX_BYTES,
  InlineIo,
  MAX_BACKOFF_BYTES,
  READ_BYTES_PER_TURN,
  READ_PROFILE,
  SLOW_READ_MS,
  SLOW_WRITE_BYTES_PER_MS,
  SLOW_WRITE_MS,
  WINDOW_OPS,
  WRITE_OPS_PER_TURN,
  WRITE_PROFILE,
} from '../../../src/device/inline-io.js'
import { FileDevice } from '../../../src/device/file-device.js'
import { Random } from '../../support/random.js'

const MiB = 1024 * 1024
/** The backoffs in requests of 4 KiB. */
const FIRST_BACKOFF_4K = FIRST_BACKOFF_BYTES / 4096
const MAX_BACKOFF_4K = MAX_BACKOFF_BYTES / 4096

/** A policy on a fake clock and a fake block count, with the calls it made counted. */
function fakePolicy(profile = READ_PROFILE): { policy: InlineIo; disk: { blocks: number; looks: number }; endTurn: () => void } {
  const disk = { blocks: 0, looks: 0 }
  const turnEnds: Array<() => void> = []
  const endTurn = (): void => {
    for (const fn of turnEnds.splice(0)) fn()
  }
  const policy = new InlineIo(profile, {
    now: () => 0,
    atTurnEnd: (fn) => turnEnds.push(fn),
    blocksRead: () => {
      disk.looks++
      return disk.blocks
    },
  })
  return { policy, disk, endTurn }
}

/** Runs `reads` reads of 4 KiB: `costMs(inline)` is each inline read's time, `blocks(i)` the block count it adds. Returns the inline ones' indexes. */
function drive(policy: InlineIo, disk: { blocks: number }, endTurn: () => void, reads: number, costMs: number, blocksPerInline: number): number[] {
  const inline: number[] = []
  for (let i = 0; i < reads; i++) {
    if (!policy.mayInline(4096)) continue
    endTurn()
    inline.push(i)
    disk.blocks += blocksPerInline
    policy.ended(costMs)
  }
  return inline
}

/** A policy that counts how often it was asked, and how often it said inline. */
class CountingPolicy extends InlineIo {
  asked = 0
  inlined = 0
  override mayInline(lengthBytes: number): boolean {
    this.asked++
    const yes = super.mayInline(lengthBytes)
    if (yes) this.inlined++
    return yes
  }
}

describe('inline-reads policy', () => {
  it('inline-reads: small reads block while fast, with one look at the block count per window; big reads never block', () => {
    const { policy, disk, endTurn } = fakePolicy()
    assert.equal(drive(policy, disk, endTurn, 10_000, 0.01, 0).length, 10_000)
    assert.equal(policy.slowSignals, 0)
    // One look to open the first window, one at the end of each.
    assert.equal(disk.looks, 1 + Math.floor(10_000 / WINDOW_OPS))
    assert.equal(policy.mayInline(INLINE_READ_MAX_BYTES), true)
    policy.ended(0)
    assert.equal(policy.mayInline(INLINE_READ_MAX_BYTES + 1), false)
  })

  it('inline-reads: past a budget of bytes per event-loop turn, the reads of that turn go to the pool', () => {
    const { policy, disk, endTurn } = fakePolicy()
    const pieceBytes = 12 * 1024
    let inlineBytes = 0
    let pool = 0
    for (let i = 0; i < 100; i++) {
      if (!policy.mayInline(pieceBytes)) {
        pool++
        continue
      }
      inlineBytes += pieceBytes
      policy.ended(0)
    }
    assert.equal(inlineBytes, Math.floor(READ_BYTES_PER_TURN / pieceBytes) * pieceBytes)
    assert.equal(pool, 100 - inlineBytes / pieceBytes)
    endTurn()
    assert.equal(policy.mayInline(pieceBytes), true, 'a new turn has the whole budget')
    policy.ended(0)
    assert.equal(policy.slowSignals, 0)
    assert.equal(drive(policy, disk, endTurn, 10, 0, 0).length, 10)
  })

  it('inline-reads: one slow read sends the next reads to the pool, then probes inline again', () => {
    const { policy, disk, endTurn } = fakePolicy()
    assert.equal(policy.mayInline(4096), true)
    policy.ended(SLOW_READ_MS * 1.01)
    assert.equal(policy.slowSignals, 1)
    for (let i = 0; i < FIRST_BACKOFF_4K; i++) assert.equal(policy.mayInline(4096), false, `read ${i} of the backoff`)
    assert.equal(policy.mayInline(4096), true)
    policy.ended(SLOW_READ_MS) // at the threshold is not slow
    assert.equal(policy.slowSignals, 1)
    assert.equal(drive(policy, disk, endTurn, 100, 0, 0).length, 100)
  })

  it('inline-reads: a block count that rose during a window sends the reads to the pool, however fast they were', () => {
    const { policy, disk, endTurn } = fakePolicy()
    const inline = drive(policy, disk, endTurn, WINDOW_OPS * 3, 0, 0)
    assert.equal(inline.length, WINDOW_OPS * 3)
    // One read of the next window goes to the disk (fast: 0 ms on the clock).
    assert.equal(policy.mayInline(4096), true)
    disk.blocks += 8
    policy.ended(0)
    for (let i = 1; i < WINDOW_OPS - 1; i++) {
      assert.equal(policy.mayInline(4096), true)
      policy.ended(0)
    }
    assert.equal(policy.slowSignals, 0, 'judged only at the end of the window')
    assert.equal(policy.mayInline(4096), true)
    policy.ended(0)
    assert.equal(policy.slowSignals, 1)
    assert.equal(policy.mayInline(4096), false)
  })

  it('inline-reads: slow probes double the backoff up to its cap; a good window resets it', () => {
    const { policy, disk, endTurn } = fakePolicy()
    const backoffs: number[] = []
    let poolRun = 0
    for (let i = 0; i < 4_000_000 && backoffs.length < 12; i++) {
      endTurn()
      if (!policy.mayInline(4096)) {
        poolRun++
        continue
      }
      if (poolRun > 0) backoffs.push(poolRun)
      poolRun = 0
      policy.ended(1) // every probe is slow
    }
    const expected = Array.from({ length: 12 }, (_, k) => Math.min(MAX_BACKOFF_4K, FIRST_BACKOFF_4K * 2 ** k))
    assert.deepEqual(backoffs, expected)
    // Now the file is warm: a probe window passes, and the next slow read backs off the first amount again.
    while (!policy.mayInline(4096));
    policy.ended(0)
    assert.equal(drive(policy, disk, endTurn, WINDOW_OPS * 2, 0, 0).length, WINDOW_OPS * 2)
    assert.equal(policy.mayInline(4096), true)
    policy.ended(1)
    let pool = 0
    while (!policy.mayInline(4096)) pool++
    assert.equal(pool, FIRST_BACKOFF_4K)
  })

  it('inline-reads: on a cold file (every read goes to the disk) under one read in a thousand blocks', () => {
    const seed = Number(process.env.TEST_SEED ?? 20261203)
    const random = new Random(seed)
    const { policy, disk, endTurn } = fakePolicy()
    const reads = 2_000_000
    let inline = 0
    for (let i = 0; i < reads; i++) {
      endTurn()
      if (!policy.mayInline(4096 * (1 + random.int(16)))) continue
      inline++
      disk.blocks += 8
      // A fast disk: some reads under the threshold, some over (seed ${seed}).
      policy.ended(random.int(2) === 0 ? 0.08 : 0.3)
    }
    assert.ok(inline > 0, `seed ${seed}: the policy never probed`)
    assert.ok(inline / reads < 0.001, `seed ${seed}: ${inline} of ${reads} reads blocked`)
  })
})

describe('inline-writes policy', () => {
  it('inline-writes: a pool-only policy (a COW\'s) never blocks, whatever the size or the turn', () => {
    const policy = InlineIo.poolOnly()
    for (const bytes of [0, 1, 512, 4096, 1024 * 1024, 32 * 1024 * 1024]) assert.equal(policy.mayInline(bytes), false, `${bytes} bytes`)
    assert.equal(policy.slowSignals, 0)
  })

  it('inline-writes: any size may block, at most a budget of writes per event-loop turn', () => {
    const { policy, endTurn } = fakePolicy(WRITE_PROFILE)
    assert.equal(policy.mayInline(32 * 1024 * 1024), true, 'the first write of a turn, whatever its size')
    policy.ended(0)
    for (let i = 1; i < WRITE_OPS_PER_TURN; i++) {
      assert.equal(policy.mayInline(i % 2 === 0 ? 4096 : 1024 * 1024), true, `write ${i} of the turn`)
      policy.ended(0)
    }
    assert.equal(policy.mayInline(512), false, 'past the budget: the pool')
    assert.equal(policy.mayInline(4096), false)
    endTurn()
    assert.equal(policy.mayInline(1024 * 1024), true, 'a new turn has the whole budget')
    policy.ended(0)
    assert.equal(policy.slowSignals, 0)
  })

  it('inline-writes: the slow limit grows with the size of the write', () => {
    const limitMs = SLOW_WRITE_MS + MiB / SLOW_WRITE_BYTES_PER_MS
    const { policy, endTurn } = fakePolicy(WRITE_PROFILE)
    assert.equal(policy.mayInline(MiB), true)
    policy.ended(limitMs) // a page-cache copy of 1 MiB at the limit is not slow
    assert.equal(policy.slowSignals, 0)
    endTurn()
    assert.equal(policy.mayInline(4096), true)
    policy.ended(limitMs * 0.5) // the same time for 4 KiB is
    assert.equal(policy.slowSignals, 1)
    for (let i = 0; i < FIRST_BACKOFF_BYTES / MiB; i++) {
      endTurn()
      assert.equal(policy.mayInline(MiB), false, `write ${i} of the backoff`)
    }
    endTurn()
    assert.equal(policy.mayInline(MiB), true)
    policy.ended(limitMs * 1.01) // a throttled 1 MiB write is slow too
    assert.equal(policy.slowSignals, 2)
  })

  it('inline-writes: a backoff counts bytes, so 4 KiB writes backed off to the cap hold 1 MiB writes back for as many bytes', () => {
    const { policy, endTurn } = fakePolicy(WRITE_PROFILE)
    // Slow 4 KiB probes until the backoff is at its cap.
    for (let backoff = FIRST_BACKOFF_BYTES; backoff < MAX_BACKOFF_BYTES; backoff *= 2) {
      endTurn()
      while (!policy.mayInline(4096));
      policy.ended(SLOW_WRITE_MS * 2)
    }
    endTurn()
    while (!policy.mayInline(4096));
    policy.ended(SLOW_WRITE_MS * 2)
    let pool = 0
    for (;;) {
      endTurn()
      if (policy.mayInline(MiB)) break
      pool++
    }
    assert.equal(pool, MAX_BACKOFF_BYTES / MiB, '1 MiB writes to the pool until the bytes of the backoff have gone')
  })
})

const dir = await mkdtemp(join(tmpdir(), 'blocksnap-inline-io-'))
after(() => rm(dir, { recursive: true, force: true }))
let files = 0

describe('file-device inline reads', () => {
  it('file-device: small reads return the file bytes whether they block or go to the pool, and zeros past a shrunk end', async () => {
    const seed = Number(process.env.TEST_SEED ?? 77)
    const random = new Random(seed)
    const sizeBytes = 1 << 20
    const model = new Uint8Array(sizeBytes)
    for (let i = 0; i < sizeBytes; i++) model[i] = (i * 31 + (i >> 12)) & 0xff
    const path = join(dir, `f${files++}`)
    // Every look at the block count finds it higher on even windows: the device keeps switching paths.
    let blocks = 0
    let looks = 0
    const policy = InlineIo.reads({ now: () => 0, blocksRead: () => (++looks % 4 === 0 ? ++blocks : blocks) })
    const device = await FileDevice.open(path, { create: sizeBytes, inlineReads: policy })
    await device.write(model, 0)
    for (let i = 0; i < 3000; i++) {
      const length = 1 + random.int(2 * INLINE_READ_MAX_BYTES)
      const offset = random.int(sizeBytes - length + 1)
      const form = random.int(3)
      let got: Uint8Array
      if (form === 0) got = await device.read(offset, length)
      else {
        got = new Uint8Array(length).fill(0xee)
        if (form === 1) await device.readInto(got, offset)
        else await new Promise<void>((resolve, reject) => device.readIntoThen(got, offset, (err) => (err === null ? resolve() : reject(err))))
      }
      assert.deepEqual(got, model.subarray(offset, offset + length), `seed ${seed}: read ${i} at ${offset}+${length}`)
    }
    assert.ok(policy.slowSignals > 0, 'the pool path ran too')
    await truncate(path, sizeBytes / 2)
    const tail = new Uint8Array(8192).fill(9)
    await device.readInto(tail, sizeBytes / 2 - 4096)
    assert.deepEqual(tail.subarray(0, 4096), model.subarray(sizeBytes / 2 - 4096, sizeBytes / 2))
    assert.ok(tail.subarray(4096).every((b) => b === 0))
    await device.close()
  })

  it('file-device: each read asks the policy once, so a read it sends to the pool goes there (every form)', async () => {
    const path = join(dir, `f${files++}`)
    let reads = 0
    const policy = new CountingPolicy(READ_PROFILE, { now: () => 0, blocksRead: () => 0 })
    const device = await FileDevice.open(path, { create: (FIRST_BACKOFF_4K + 1) * 4096, inlineReads: policy })
    // A slow signal: the next reads of 4 KiB belong to the pool for the first backoff, then one probes inline.
    assert.equal(policy.mayInline(4096), true)
    policy.ended(SLOW_READ_MS * 2)
    policy.asked = 0
    policy.inlined = 0
    const target = new Uint8Array(4096)
    for (let i = 0; i <= FIRST_BACKOFF_4K; i++) {
      const form = i % 3
      if (form === 0) await device.readInto(target, i * 4096)
      else if (form === 1) await device.read(i * 4096, 4096)
      else await new Promise<void>((resolve, reject) => device.readIntoThen(target, i * 4096, (err) => (err === null ? resolve() : reject(err))))
      reads++
    }
    assert.equal(policy.asked, reads)
    assert.equal(policy.inlined, 1, 'only the probe after the backoff ran inline')
    await device.close()
  })

  it('file-device: an inline read completes its callback later, never from inside readIntoThen', async () => {
    const path = join(dir, `f${files++}`)
    const policy = InlineIo.reads({ now: () => 0, blocksRead: () => 0 })
    const device = await FileDevice.open(path, { create: 8192, inlineReads: policy })
    await device.write(new Uint8Array(8192).fill(5), 0)
    const target = new Uint8Array(4096)
    let called = false
    let calledInside = true
    const err = await new Promise<unknown>((resolve) => {
      device.readIntoThen(target, 4096, (e) => {
        called = true
        resolve(e)
      })
      calledInside = called
    })
    assert.equal(err, null)
    assert.equal(calledInside, false)
    assert.ok(target.every((b) => b === 5))
    assert.equal(policy.slowSignals, 0)
    await device.close()
  })
})

describe('file-device inline writes', () => {
  it('file-device: writes land the same bytes whether they block or go to the pool (every form, with and without FUA)', async () => {
    const seed = Number(process.env.TEST_SEED ?? 4242)
    const random = new Random(seed)
    const sizeBytes = 4 << 20
    const model = new Uint8Array(sizeBytes)
    const path = join(dir, `f${files++}`)
    // Every fourth look at the block count finds it higher: writes keep switching paths.
    let blocks = 0
    let looks = 0
    const policy = new CountingPolicy(WRITE_PROFILE, { now: () => 0, blocksRead: () => (++looks % 4 === 0 ? ++blocks : blocks) })
    const device = await FileDevice.open(path, { create: sizeBytes, inlineWrites: policy })
    let writes = 0
    for (let i = 0; i < 1500; i++) {
      const length = 1 + random.int(i % 50 === 0 ? 2 << 20 : 64 * 1024)
      const offset = random.int(sizeBytes - length + 1)
      const data = new Uint8Array(length)
      for (let k = 0; k < length; k += 97) data[k] = (i + k) & 0xff
      const fua = random.int(8) === 0
      if (random.int(2) === 0) await device.write(data, offset, { fua })
      else await new Promise<void>((resolve, reject) => device.writeThen(data, offset, fua, (err) => (err === null ? resolve() : reject(err))))
      model.set(data, offset)
      writes++
    }
    assert.equal(policy.asked, writes, 'each write asks the policy once')
    assert.ok(policy.inlined > 0 && policy.inlined < writes, `seed ${seed}: both paths ran (${policy.inlined} of ${writes} inline)`)
    assert.ok(policy.slowSignals > 0)
    await device.flush()
    const got = await device.read(0, sizeBytes)
    assert.ok(Buffer.from(got).equals(Buffer.from(model)), `seed ${seed}: the file holds what was written`)
    // What the device said it wrote is what a reader of the file finds, not only what it reads back itself.
    assert.ok((await readFile(path)).equals(Buffer.from(model)), `seed ${seed}: the file on disk`)
    await device.close()
  })

  it('file-device: an inline write completes its callback later, never from inside writeThen (with and without FUA)', async () => {
    const path = join(dir, `f${files++}`)
    const policy = InlineIo.writes({ now: () => 0, blocksRead: () => 0 })
    const device = await FileDevice.open(path, { create: 8192, inlineWrites: policy })
    for (const fua of [false, true]) {
      let called = false
      let calledInside = true
      const err = await new Promise<unknown>((resolve) => {
        device.writeThen(new Uint8Array(4096).fill(fua ? 7 : 6), fua ? 4096 : 0, fua, (e) => {
          called = true
          resolve(e)
        })
        calledInside = called
      })
      assert.equal(err, null)
      assert.equal(calledInside, false, `fua ${fua}`)
    }
    assert.equal(policy.slowSignals, 0)
    const back = await readFile(path)
    assert.ok(back.subarray(0, 4096).every((b) => b === 6) && back.subarray(4096).every((b) => b === 7))
    await device.close()
  })
})
