/**
 * Out of space is an error, not an invalidation (issue 14, item 1). Grow-on-demand COWs live on
 * a simulated small file system (SpaceLimitedDevice: sparse files, torn writes at ENOSPC). A copy
 * that cannot get space must fail the origin write that needed it with SNAP_NO_SPACE, leave the
 * origin's bytes as they were, keep every snapshot valid with its point-in-time view, and leave
 * the COW reopenable; once space returns, the same write succeeds. Every view is compared with
 * an independent model after each step.
 */
import assert from 'node:assert/strict'
import { describe, it } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { isSnapError } from '../../src/errors.js'
import { startMerge } from '../../src/merge/merge.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import { Snapshot } from '../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../src/store/persistent-store.js'
import { TransientStore } from '../../src/store/transient-store.js'
import { Random } from '../support/random.js'
import { FileSystemSpace, SpaceLimitedDevice } from '../support/space-limited-device.js'

const KiB = 1024
const MiB = 1024 * KiB

type Kind = 'P' | 'N'

interface SnapRig {
  readonly name: string
  readonly kind: Kind
  readonly chunkBytes: number
  readonly base: MemoryDevice
  readonly dev: SpaceLimitedDevice
  snap: Snapshot
  /** The snapshot's expected view: the origin at the time it was taken. */
  readonly model: Uint8Array
}

interface Rig {
  readonly origin: Origin
  readonly originBase: MemoryDevice
  readonly model: Uint8Array // the origin's expected content
  readonly snaps: SnapRig[]
}

function newStore(kind: Kind, dev: SpaceLimitedDevice, chunkBytes: number) {
  return kind === 'P' ? new PersistentStore(dev, { chunkBytes, growable: true }) : new TransientStore(dev, { chunkBytes, growable: true })
}

async function makeRig(seed: number, originBytes: number, writeBackBytes = 0): Promise<Rig> {
  const bytes = new Random(seed).bytes(originBytes)
  const originBase = MemoryDevice.fromBytes(bytes)
  const origin = new Origin(originBase, { events: new ExceptionEvents(), writeBackBytes })
  return { origin, originBase, model: bytes.slice(), snaps: [] }
}

async function addSnap(rig: Rig, name: string, kind: Kind, chunkBytes: number, space: FileSystemSpace): Promise<SnapRig> {
  const base = new MemoryDevice(0)
  const dev = new SpaceLimitedDevice(base, space, `/fs/${name}.cow`)
  const snap = new Snapshot({ name, store: newStore(kind, dev, chunkBytes) })
  await rig.origin.addSnapshot(snap)
  const s: SnapRig = { name, kind, chunkBytes, base, dev, snap, model: rig.model.slice() }
  rig.snaps.push(s)
  return s
}

async function checkViews(rig: Rig, where: string): Promise<void> {
  const size = rig.model.length
  assert.ok(Buffer.from(await rig.origin.read(0, size)).equals(rig.model), `${where}: origin view`)
  assert.ok(rig.originBase.readSync(0, size).every((b, i) => b === rig.model[i]), `${where}: origin device`)
  for (const s of rig.snaps) {
    assert.equal(s.snap.state, 'active', `${where}: ${s.name} must stay valid`)
    assert.ok(Buffer.from(await s.snap.read(0, size)).equals(s.model), `${where}: ${s.name} view`)
  }
}

/** Writes through the origin; applies the write to the model only when it succeeded. */
async function originWrite(rig: Rig, data: Uint8Array, offset: number): Promise<'ok' | 'no-space'> {
  try {
    await rig.origin.write(data, offset)
    rig.model.set(data, offset)
    return 'ok'
  } catch (err) {
    if (!isSnapError(err, 'SNAP_NO_SPACE')) throw err
    return 'no-space'
  }
}

/** Closes the rig and opens its persistent snapshots again over the same bytes. */
async function reopen(rig: Rig): Promise<Rig> {
  await rig.origin.flush()
  const originImage = rig.originBase.clone()
  const images = rig.snaps.filter((s) => s.kind === 'P').map((s) => [s, s.base.clone()] as const)
  await rig.origin.close()
  const origin = new Origin(originImage, { events: new ExceptionEvents(), writeBackBytes: 0 })
  const next: Rig = { origin, originBase: originImage, model: rig.model, snaps: [] }
  for (const [s, image] of images) {
    const dev = new SpaceLimitedDevice(image, new FileSystemSpace(), `/fs/${s.name}.cow`)
    const snap = new Snapshot({ name: s.name, store: newStore('P', dev, s.chunkBytes) })
    await origin.addSnapshot(snap)
    next.snaps.push({ ...s, base: image, dev, snap })
  }
  return next
}

describe('no space: a grow-on-demand COW on a full file system', () => {
  for (const kind of ['P', 'N'] as const) {
    it(`${kind}: the origin write fails with SNAP_NO_SPACE, nothing lands, nothing is invalidated; it succeeds once space returns`, async () => {
      const rig = await makeRig(1, 4 * MiB)
      const space = new FileSystemSpace()
      const s = await addSnap(rig, 's', kind, 4 * KiB, space)
      const random = new Random(2)
      // Warm up: the COW has grown and holds some chunks.
      assert.equal(await originWrite(rig, random.bytes(64 * KiB), 0), 'ok')
      await checkViews(rig, 'warm-up')

      space.leaveFree(0)
      const usage = s.snap.usage()
      const data = random.bytes(256 * KiB)
      const offset = 1 * MiB + 512 // not chunk aligned: partial chunks at both ends
      await assert.rejects(rig.origin.write(data, offset), (err: unknown) => {
        assert.ok(isSnapError(err, 'SNAP_NO_SPACE'), String(err))
        assert.match(err.message, /snapshot s/)
        assert.match(err.message, /no space left on device/)
        assert.equal(err.message.includes('\n'), false)
        return true
      })
      assert.ok(s.dev.noSpaceWrites > 0, 'the COW really ran out of space')
      await checkViews(rig, 'after ENOSPC')
      // Again, while still full: the same answer, still nothing invalidated.
      assert.equal(await originWrite(rig, data, offset), 'no-space')
      await checkViews(rig, 'after the second ENOSPC')
      assert.equal(s.snap.usage().allocatedSectors, usage.allocatedSectors, 'abandoned chunks are handed out again, not leaked')

      space.limitBytes = Infinity
      assert.equal(await originWrite(rig, data, offset), 'ok')
      await checkViews(rig, 'after space returned')
      if (kind === 'P') {
        const again = await reopen(rig)
        await checkViews(again, 'reopened')
        assert.equal(await originWrite(again, random.bytes(300 * KiB), 2 * MiB + 7 * 512), 'ok')
        await checkViews(again, 'written after reopen')
        await again.origin.close()
      } else {
        await rig.origin.close()
      }
    })
  }

  it('P: a write spanning chunks some of whose copies succeeded changes no origin byte; the saved chunks read right', async () => {
    const rig = await makeRig(3, 2 * MiB)
    const space = new FileSystemSpace()
    const s = await addSnap(rig, 's', 'P', 4 * KiB, space)
    const random = new Random(4)
    // Chunk 1 saved already, so the write over chunks 0..3 copies two runs: [0] and [2, 3].
    assert.equal(await originWrite(rig, random.bytes(4 * KiB), 4 * KiB), 'ok')
    space.leaveFree(4 * KiB) // room for the first run only
    const writesBefore = s.snap.table.size
    assert.equal(await originWrite(rig, random.bytes(16 * KiB), 0), 'no-space')
    assert.equal(s.snap.table.size, writesBefore + 1, 'the run that fitted is saved')
    assert.notEqual(s.snap.table.lookup(0), -1)
    assert.equal(s.snap.table.lookup(2), -1)
    await checkViews(rig, 'partly copied')
    space.limitBytes = Infinity
    assert.equal(await originWrite(rig, random.bytes(16 * KiB), 0), 'ok')
    await checkViews(rig, 'after space returned')
    const again = await reopen(rig)
    await checkViews(again, 'reopened')
    await again.origin.close()
  })

  it('two snapshots, one with room and one without: the write fails, both keep their views', async () => {
    const rig = await makeRig(5, 2 * MiB)
    const roomy = await addSnap(rig, 'roomy', 'P', 4 * KiB, new FileSystemSpace())
    const fullSpace = new FileSystemSpace()
    const full = await addSnap(rig, 'full', 'P', 16 * KiB, fullSpace)
    const random = new Random(6)
    assert.equal(await originWrite(rig, random.bytes(32 * KiB), 0), 'ok')
    fullSpace.leaveFree(0)
    assert.equal(await originWrite(rig, random.bytes(100 * KiB), 512 * KiB), 'no-space')
    assert.ok(roomy.snap.table.size > 8, 'the snapshot with room saved its chunks')
    await checkViews(rig, 'one full')
    // A snapshot taken now sees the origin as it is: the refused write is not in it either.
    const late = await addSnap(rig, 'late', 'N', 8 * KiB, new FileSystemSpace())
    assert.equal(await originWrite(rig, random.bytes(64 * KiB), 1 * MiB), 'no-space')
    await checkViews(rig, 'with a late snapshot')
    fullSpace.limitBytes = Infinity
    assert.equal(await originWrite(rig, random.bytes(100 * KiB), 512 * KiB), 'ok')
    await checkViews(rig, 'after space returned')
    assert.equal(late.snap.state, 'active')
    assert.equal(full.snap.state, 'active')
    const again = await reopen(rig)
    await checkViews(again, 'reopened')
    await again.origin.close()
  })

  it('write-back: a held write whose copy runs out of space is dropped, fails the next flush, and invalidates nothing', async () => {
    const rig = await makeRig(7, 2 * MiB, 4 * MiB)
    const space = new FileSystemSpace()
    await addSnap(rig, 's', 'P', 4 * KiB, space)
    const random = new Random(8)
    assert.equal(await originWrite(rig, random.bytes(8 * KiB), 0), 'ok')
    await rig.origin.flush()
    space.leaveFree(0)
    const data = random.bytes(64 * KiB)
    await rig.origin.write(data, 256 * KiB) // answered at once: held until its copies commit
    await assert.rejects(rig.origin.flush(), (err: unknown) => isSnapError(err, 'SNAP_NO_SPACE') && /write-back/.test(err.message))
    assert.equal(rig.origin.heldBytes, 0)
    await checkViews(rig, 'held write dropped') // the model never took the write
    await rig.origin.flush() // reported once
    space.limitBytes = Infinity
    await rig.origin.write(data, 256 * KiB)
    rig.model.set(data, 256 * KiB)
    await rig.origin.flush()
    await checkViews(rig, 'after space returned')
    const again = await reopen(rig)
    await checkViews(again, 'reopened')
    await again.origin.close()
  })

  it('a snapshot write that needs a new chunk fails with SNAP_NO_SPACE and leaves the snapshot valid', async () => {
    const rig = await makeRig(9, 1 * MiB)
    const space = new FileSystemSpace()
    const s = await addSnap(rig, 's', 'P', 4 * KiB, space)
    const random = new Random(10)
    assert.equal(await originWrite(rig, random.bytes(4 * KiB), 0), 'ok')
    space.leaveFree(0)
    for (const [length, offset] of [
      [4 * KiB, 64 * KiB], // whole chunk: the write is the copy
      [512, 128 * KiB + 512], // part of a chunk: copy first
    ] as const) {
      await assert.rejects(s.snap.write(random.bytes(length), offset), (err: unknown) => isSnapError(err, 'SNAP_NO_SPACE'))
    }
    await checkViews(rig, 'snapshot writes refused')
    space.limitBytes = Infinity
    const data = random.bytes(512)
    await s.snap.write(data, 128 * KiB + 512)
    s.model.set(data, 128 * KiB + 512)
    await checkViews(rig, 'snapshot written')
    await rig.origin.close()
  })

  it('merge: relocation into a snapshot without space fails the merge step (resumable), not the other snapshot', async () => {
    const rig = await makeRig(14, 1 * MiB)
    const m = await addSnap(rig, 'm', 'P', 4 * KiB, new FileSystemSpace())
    const random = new Random(15)
    for (const offset of [0, 200 * KiB, 700 * KiB]) assert.equal(await originWrite(rig, random.bytes(64 * KiB), offset), 'ok')
    const space = new FileSystemSpace()
    const o = await addSnap(rig, 'o', 'P', 4 * KiB, space)
    space.leaveFree(0)
    const first = await startMerge(rig.origin, m.snap)
    await assert.rejects(first.done, (err: unknown) => isSnapError(err) && /no space/.test(err.message))
    assert.equal(first.state, 'failed')
    assert.equal(o.snap.state, 'active', 'the snapshot without space is not invalidated')
    assert.ok(Buffer.from(await o.snap.read(0, 1 * MiB)).equals(o.model), 'its view is intact')
    assert.ok(Buffer.from(await rig.origin.read(0, 1 * MiB)).equals(m.model), 'the origin presents the merged view')
    space.limitBytes = Infinity
    const second = await startMerge(rig.origin, m.snap)
    await second.done
    assert.equal(second.state, 'complete')
    assert.ok(Buffer.from(await rig.origin.read(0, 1 * MiB)).equals(m.model), 'origin rolled back')
    assert.ok(rig.originBase.readSync(0, 1 * MiB).every((b, i) => b === m.model[i]), 'on the device too')
    assert.equal(o.snap.state, 'active')
    assert.ok(Buffer.from(await o.snap.read(0, 1 * MiB)).equals(o.model), 'the other snapshot kept its view')
    await rig.origin.close()
  })

  for (const seed of [11, 12, 13]) {
    it(`randomized (seed ${seed}): space comes and goes under concurrent writes; every view always matches, the COWs reopen`, async () => {
      const random = new Random(seed)
      const originBytes = 1 * MiB
      const rig = await makeRig(seed, originBytes, random.pick([0, 256 * KiB]))
      const space = new FileSystemSpace()
      // 512-byte chunks cross a metadata area every 16.5 KiB of COW, so growth steps that
      // fail while writing future areas are exercised too.
      await addSnap(rig, 'a', 'P', 512, space)
      await addSnap(rig, 'b', 'P', 4 * KiB, space)
      await addSnap(rig, 'c', 'N', 8 * KiB, space)
      const outcomes = { ok: 0, 'no-space': 0 }
      for (let round = 0; round < 40; round++) {
        if (random.int(3) === 0) space.limitBytes = Infinity
        else space.leaveFree(random.int(48) * 4 * KiB)
        if (round === 20) await addSnap(rig, 'late', 'P', 2 * KiB, space)
        // Writes in a batch do not overlap, so the model does not depend on their order.
        const slots = random.int(6) + 1
        const slotBytes = Math.floor(originBytes / slots / 512) * 512
        const batch: Array<Promise<void>> = []
        const acknowledged: Array<[Uint8Array, number]> = []
        for (let i = 0; i < slots; i++) {
          const length = 512 * (1 + random.int(Math.min(128, slotBytes / 512 - 1)))
          const offset = i * slotBytes + 512 * random.int((slotBytes - length) / 512 + 1)
          const data = random.bytes(length)
          batch.push(
            rig.origin.write(data, offset).then(
              () => {
                outcomes.ok++
                acknowledged.push([data, offset])
              },
              (err: unknown) => {
                if (!isSnapError(err, 'SNAP_NO_SPACE')) throw err
                outcomes['no-space']++
              },
            ),
          )
        }
        await Promise.all(batch)
        // Under write-back an acknowledged write may still be dropped: the flush says which.
        let flushed = true
        await rig.origin.flush().catch((err: unknown) => {
          if (!isSnapError(err, 'SNAP_NO_SPACE')) throw err
          flushed = false
        })
        if (flushed) for (const [data, offset] of acknowledged) rig.model.set(data, offset)
        else {
          // Which held writes were dropped is not reported one by one: read the origin back and
          // check each acknowledged write landed whole or not at all.
          for (const [data, offset] of acknowledged) {
            const now = await rig.origin.read(offset, data.length)
            if (Buffer.from(now).equals(data)) rig.model.set(data, offset)
            else assert.ok(Buffer.from(now).equals(rig.model.subarray(offset, offset + data.length)), `round ${round}: a dropped write left partial data`)
          }
        }
        await checkViews(rig, `seed ${seed} round ${round}`)
      }
      assert.ok(outcomes['no-space'] > 0 && outcomes.ok > 0, `both outcomes seen: ${JSON.stringify(outcomes)}`)
      const again = await reopen(rig)
      await checkViews(again, `seed ${seed} reopened`)
      await again.origin.close()
    })
  }
})
