/**
 * Issue 19 item 3, through the Volume API: the exact sequence of events a volume emits as its
 * snapshots fill (warnings at 80/85/90/95 % once each, one event per check naming the highest
 * level reached), as autoextend grows a fixed-size COW (by the LVM rule, recorded in the
 * manifest, the COW still a valid kernel-format COW with the snapshot's data), when the file
 * system has no room for the extension (kernel semantics: warnings, then invalidation), and as
 * a merge runs. Expected events come from a model of the fill in chunks, not from the code.
 */
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, stat, truncate } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { isSnapError } from '../../../src/errors.js'
import { FaultyDevice } from '../../support/faulty-device.js'
import { MemoryDevice } from '../../../src/device/memory-device.js'
import { Origin } from '../../../src/snapshot/origin.js'
import { MANIFEST_FILE } from '../../../src/volume/manifest.js'
import { checkCow } from '../../../src/volume/check.js'
import type { VolumeEvent } from '../../../src/volume/volume-events.js'
import { type SnapshotCreateOptions, Volume } from '../../../src/volume/volume.js'
import { fillFileSystem, onTmpfs } from '../../support/tmpfs.js'

const CHUNK = 4096
const SIZE = 1024 * 1024
/** A fixed COW of 100 chunks: header and first metadata area take 2, so 1 % per chunk. */
const COW_CHUNKS = 100

let T = ''
before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-events-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

/** The origin's bytes before any write: chunk k filled with k+1 (mod 256). */
function originPattern(): Uint8Array {
  const bytes = new Uint8Array(SIZE)
  for (let k = 0; k < SIZE / CHUNK; k++) bytes.fill((k + 1) & 0xff, k * CHUNK, (k + 1) * CHUNK)
  return bytes
}

interface Opened {
  readonly volume: Volume
  readonly dir: string
  readonly events: VolumeEvent[]
}

let counter = 0
async function volumeWithSnapshot(options: SnapshotCreateOptions): Promise<Opened> {
  const dir = join(T, `v${++counter}`)
  await Volume.create(dir, { sizeBytes: SIZE })
  const volume = await Volume.open(dir, { writeBackBytes: 0 })
  await volume.origin.write(originPattern(), 0)
  await volume.createSnapshot('s', { chunkSizeBytes: CHUNK, ...options })
  const events: VolumeEvent[] = []
  volume.onEvent((e) => events.push(e))
  return { volume, dir, events }
}

/** Overwrites origin chunks [first, first+count) and waits for the fill work it caused. */
/**
 * A new volume at `dir`, write-through, whose origin already holds the pattern: its blocks are
 * allocated, so on a nearly full file system only snapshot copies need room.
 */
async function openWrittenVolume(dir: string): Promise<Volume> {
  await Volume.create(dir, { sizeBytes: SIZE })
  const volume = await Volume.open(dir, { writeBackBytes: 0 })
  try {
    await volume.origin.write(originPattern(), 0)
  } catch (err) {
    await volume.close().catch(() => {})
    throw err
  }
  return volume
}

async function overwrite(volume: Volume, first: number, count: number): Promise<void> {
  await volume.origin.write(new Uint8Array(count * CHUNK).fill(0xee), first * CHUNK)
  await volume.origin.flush()
  await volume.settled()
}

function percentOf(part: number, whole: number): number {
  return Math.round((10000 * part) / whole) / 100
}

function fillEvent(dir: string, level: number, allocatedChunks: number, cowChunks: number): VolumeEvent {
  return {
    type: 'fill-threshold',
    volume: dir.split('/').pop() as string,
    snapshot: 's',
    thresholdPercent: level,
    percent: percentOf(allocatedChunks, cowChunks),
    allocatedBytes: allocatedChunks * CHUNK,
    cowBytes: cowChunks * CHUNK,
    capacityBytes: cowChunks * CHUNK,
  }
}

async function assertSnapshotHoldsPattern(volume: Volume, what: string): Promise<void> {
  const seen = await volume.snapshot('s').read(0, SIZE)
  assert.ok(Buffer.from(seen).equals(Buffer.from(originPattern())), `${what}: the snapshot still reads the origin as it was`)
}

describe('fill warnings', () => {
  it('a fixed-size COW warns at 80, 85, 90 and 95 % once each, then is invalidated when full (COW full)', async () => {
    const { volume, dir, events } = await volumeWithSnapshot({ cowSizeBytes: COW_CHUNKS * CHUNK })
    try {
      const expected: VolumeEvent[] = []
      let warned = 0
      for (let k = 0; k < COW_CHUNKS - 2; k++) {
        await overwrite(volume, k, 1)
        const allocated = 3 + k
        for (const level of [80, 85, 90, 95]) {
          if (level > warned && allocated >= level) {
            warned = level
            expected.push(fillEvent(dir, level, allocated, COW_CHUNKS))
          }
        }
        assert.deepEqual(events, expected, `after ${k + 1} chunk writes`)
      }
      assert.equal(events.length, 4)
      // The COW is exactly full: the next copy has nowhere to go.
      await overwrite(volume, COW_CHUNKS, 1)
      expected.push({ type: 'snapshot-invalidated', volume: volume.name, snapshot: 's', reason: 'COW full', cowPath: join(dir, 'snapshots', 's.cow') })
      assert.deepEqual(events, expected)
      await overwrite(volume, COW_CHUNKS + 1, 1)
      assert.equal(events.length, expected.length, 'an invalid snapshot reports nothing more')
    } finally {
      await volume.close()
    }
  })

  it('a burst past several levels reports once, naming the highest level reached', async () => {
    const { volume, dir, events } = await volumeWithSnapshot({ cowSizeBytes: COW_CHUNKS * CHUNK })
    try {
      await overwrite(volume, 0, 66) // 68 %: no level
      assert.deepEqual(events, [])
      await overwrite(volume, 66, 24) // 92 %: past 80, 85 and 90
      assert.deepEqual(events, [fillEvent(dir, 90, 92, COW_CHUNKS)])
    } finally {
      await volume.close()
    }
  })

  it('--warn-at 50 warns at 50 and every 5 % after it; none with warnAtPercent null; a level crossed before an open is not repeated', async () => {
    const { volume, dir, events } = await volumeWithSnapshot({ cowSizeBytes: COW_CHUNKS * CHUNK, warnAtPercent: 52 })
    try {
      await overwrite(volume, 0, 50) // 52 %
      await overwrite(volume, 50, 4) // 56 %
      assert.deepEqual(events, [fillEvent(dir, 52, 52, COW_CHUNKS), fillEvent(dir, 55, 56, COW_CHUNKS)])
    } finally {
      await volume.close()
    }
    const again = await Volume.open(dir, { writeBackBytes: 0 })
    const later: VolumeEvent[] = []
    again.onEvent((e) => later.push(e))
    try {
      await overwrite(again, 54, 3) // 59 %: 55 was reported before the reopen
      assert.deepEqual(later, [])
      again.reportFill() // what serve does at start
      assert.deepEqual(later, [fillEvent(dir, 55, 59, COW_CHUNKS)])
      await overwrite(again, 57, 1) // 60 %
      assert.deepEqual(later.slice(1), [fillEvent(dir, 60, 60, COW_CHUNKS)])
    } finally {
      await again.close()
    }
    const quiet = await volumeWithSnapshot({ cowSizeBytes: COW_CHUNKS * CHUNK, warnAtPercent: null })
    try {
      await overwrite(quiet.volume, 0, 97)
      assert.deepEqual(quiet.events, [])
      assert.equal((await quiet.volume.info()).snapshots[0]?.warnAtPercent, null)
    } finally {
      await quiet.volume.close()
    }
  })

  it('refuses fill options that make no sense, naming the flag', async () => {
    const { volume } = await volumeWithSnapshot({})
    try {
      const refused = async (options: SnapshotCreateOptions, pattern: RegExp) => {
        await assert.rejects(volume.createSnapshot('x', { chunkSizeBytes: CHUNK, ...options }), (err: unknown) => {
          assert.ok(isSnapError(err, 'SNAP_BAD_ARGUMENT'), String(err))
          assert.match(err.message, pattern)
          return true
        })
      }
      await refused({ autoextendThresholdPercent: 70 }, /--autoextend-threshold needs --cow-size/)
      await refused({ cowSizeBytes: COW_CHUNKS * CHUNK, autoextendPercent: 20 }, /--autoextend-percent needs --autoextend-threshold/)
      await refused({ cowSizeBytes: COW_CHUNKS * CHUNK, warnAtPercent: 100 }, /--warn-at 100 must be a whole percentage from 1 to 99/)
      await refused({ cowSizeBytes: COW_CHUNKS * CHUNK, autoextendThresholdPercent: 0 }, /--autoextend-threshold 0/)
      await refused({ cowSizeBytes: COW_CHUNKS * CHUNK, autoextendThresholdPercent: 70, autoextendPercent: 0 }, /--autoextend-percent 0/)
      assert.deepEqual(volume.records.map((r) => r.name), ['s'])
    } finally {
      await volume.close()
    }
  })
})

/** The LVM rule in chunks: grow by `percent` of the size until the fill is below the threshold. */
function modelTarget(sizeChunks: number, allocatedChunks: number, threshold: number, percent: number): number {
  let size = sizeChunks
  do size += Math.max(1, Math.ceil((size * percent) / 100))
  while (allocatedChunks * 100 >= threshold * size)
  return size
}

describe('autoextend', () => {
  it('grows the COW by the LVM rule at each crossing of the threshold, records it, and the snapshot stays valid and intact', async () => {
    const { volume, dir, events } = await volumeWithSnapshot({ cowSizeBytes: COW_CHUNKS * CHUNK, autoextendThresholdPercent: 70, autoextendPercent: 20 })
    const expected: VolumeEvent[] = []
    let size = COW_CHUNKS
    try {
      for (let k = 0; k < 150; k++) {
        await overwrite(volume, k, 1)
        const allocated = 3 + k
        if (allocated * 100 >= 70 * size) {
          const to = modelTarget(size, allocated, 70, 20)
          expected.push({
            type: 'cow-extended',
            volume: volume.name,
            snapshot: 's',
            fromBytes: size * CHUNK,
            toBytes: to * CHUNK,
            percent: percentOf(allocated, to),
            allocatedBytes: allocated * CHUNK,
          })
          size = to
        }
        assert.deepEqual(events, expected, `after ${k + 1} chunk writes`)
      }
      assert.ok(expected.length >= 3, 'the test crosses the threshold several times')
      const manifest = JSON.parse(await readFile(join(dir, MANIFEST_FILE), 'utf8'))
      assert.equal(manifest.snapshots[0].cowSizeBytes, size * CHUNK, 'the manifest records the new size')
      assert.deepEqual(manifest.snapshots[0].autoextend, { thresholdPercent: 70, percent: 20 })
      assert.equal((await stat(join(dir, 'snapshots', 's.cow'))).size, size * CHUNK)
      assert.equal(volume.statusLine('s'), `0 ${SIZE / 512} snapshot ${152 * 8}/${size * 8} 16`)
      await assertSnapshotHoldsPattern(volume, 'open')
    } finally {
      await volume.close()
    }
    assert.deepEqual(await checkCow(join(dir, 'snapshots', 's.cow'), { originSizeBytes: SIZE }), [])
    const again = await Volume.open(dir)
    try {
      await assertSnapshotHoldsPattern(again, 'reopened')
      assert.equal(again.snapshot('s').valid, true)
    } finally {
      await again.close()
    }
  })

  it('keeps up with one write bigger than the COW: the copies wait for each extension instead of invalidating', async () => {
    const { volume, dir, events } = await volumeWithSnapshot({ cowSizeBytes: COW_CHUNKS * CHUNK, autoextendThresholdPercent: 70, autoextendPercent: 20 })
    try {
      await overwrite(volume, 0, 200)
      // 98 chunks fit; full at 100 of 100 -> 144; full at 144 of 144 -> 208; the last 58
      // bring it to 202 of 208 (97 %) at their commit -> 300.
      const steps = [
        [100, 144, 100],
        [144, 208, 144],
        [208, 300, 202],
      ] as const
      assert.deepEqual(
        events,
        steps.map(([from, to, allocated]) => ({
          type: 'cow-extended',
          volume: volume.name,
          snapshot: 's',
          fromBytes: from * CHUNK,
          toBytes: to * CHUNK,
          percent: percentOf(allocated, to),
          allocatedBytes: allocated * CHUNK,
        })),
      )
      assert.equal(volume.snapshot('s').valid, true)
      await assertSnapshotHoldsPattern(volume, 'after the burst')
      assert.equal(JSON.parse(await readFile(join(dir, MANIFEST_FILE), 'utf8')).snapshots[0].cowSizeBytes, 300 * CHUNK)
    } finally {
      await volume.close()
    }
  })

  it('without room on the file system: reported once, then the warnings and, when full, invalidation (kernel semantics)', async () => {
    // Growing by 10^12 % asks for petabytes: more than any test machine has free.
    const { volume, dir, events } = await volumeWithSnapshot({ cowSizeBytes: COW_CHUNKS * CHUNK, autoextendThresholdPercent: 70, autoextendPercent: 1e12 })
    try {
      for (let k = 0; k < COW_CHUNKS - 2; k++) await overwrite(volume, k, 1)
      await overwrite(volume, COW_CHUNKS, 1)
      const failed = events[0]
      assert.ok(failed?.type === 'cow-extend-failed', JSON.stringify(events[0]))
      assert.match(failed.reason, new RegExp(`^the file system holding ${join(dir, 'snapshots', 's.cow')} has \\d+ bytes free, \\d+ needed$`))
      assert.deepEqual(
        { ...failed, reason: '' },
        { type: 'cow-extend-failed', volume: volume.name, snapshot: 's', fromBytes: COW_CHUNKS * CHUNK, toBytes: (COW_CHUNKS + 1e12) * CHUNK, reason: '' },
      )
      assert.deepEqual(events.slice(1), [
        fillEvent(dir, 80, 80, COW_CHUNKS),
        fillEvent(dir, 85, 85, COW_CHUNKS),
        fillEvent(dir, 90, 90, COW_CHUNKS),
        fillEvent(dir, 95, 95, COW_CHUNKS),
        { type: 'snapshot-invalidated', volume: volume.name, snapshot: 's', reason: 'COW full', cowPath: join(dir, 'snapshots', 's.cow') },
      ])
      assert.equal(JSON.parse(await readFile(join(dir, MANIFEST_FILE), 'utf8')).snapshots[0].cowSizeBytes, COW_CHUNKS * CHUNK)
      assert.equal((await stat(join(dir, 'snapshots', 's.cow'))).size, COW_CHUNKS * CHUNK)
    } finally {
      await volume.close()
    }
  })
})

describe('space events', () => {
  it('a copy-out that finds the file system full emits snapshot-no-space, and space-restored once copies succeed again', async (t) => {
    await onTmpfs(4, async (mnt) => {
      let volume: Volume | null = null
      try {
        const dir = join(mnt, 'v')
        volume = await openWrittenVolume(dir) // only the COW needs room later
        await volume.createSnapshot('s', { chunkSizeBytes: CHUNK })
        const events: VolumeEvent[] = []
        volume.onEvent((e) => events.push(e))
        const filler = join(mnt, 'filler')
        await fillFileSystem(filler)
        await assert.rejects(volume.origin.write(new Uint8Array(64 * CHUNK).fill(0xee), 0), (err: unknown) => isSnapError(err, 'SNAP_NO_SPACE'))
        await volume.settled()
        const cowPath = join(dir, 'snapshots', 's.cow')
        const noSpace = events.filter((e) => e.type === 'snapshot-no-space')
        assert.equal(noSpace.length, 1, `one snapshot-no-space event: ${JSON.stringify(events)}`)
        assert.deepEqual({ ...noSpace[0], reason: undefined }, { type: 'snapshot-no-space', volume: 'v', snapshot: 's', cowPath, reason: undefined })
        assert.ok(!events.some((e) => e.type === 'snapshot-invalidated'), 'nothing invalidated')
        await rm(filler)
        await volume.origin.write(new Uint8Array(64 * CHUNK).fill(0xee), 0)
        await volume.settled()
        assert.deepEqual(events.filter((e) => e.type === 'snapshot-space-restored'), [{ type: 'snapshot-space-restored', volume: 'v', snapshot: 's', cowPath }])
        assert.deepEqual(Buffer.from(await volume.snapshot('s').read(0, 64 * CHUNK)), Buffer.from(originPattern().subarray(0, 64 * CHUNK)), 'the snapshot kept its view')
      } finally {
        await volume?.close().catch(() => {})
      }
    }, (reason) => t.skip(reason))
  })
})

describe('merge events', () => {
  it('started, every ten percent, done', async () => {
    const { volume, events } = await volumeWithSnapshot({})
    try {
      await overwrite(volume, 0, 20)
      events.length = 0
      const merge = await volume.startMerge('s', { maxStepChunks: 1 })
      await merge.done
      const base = { volume: volume.name, snapshot: 's' }
      const total = 20 * CHUNK
      assert.deepEqual(events[0], { type: 'merge-started', ...base, totalBytes: total, rateBytesPerSecond: null })
      const progress = events.slice(1, -1).map((e) => {
        assert.equal(e.type, 'merge-progress')
        const { rateBytesPerSecond: _rate, etaSeconds: _eta, ...fixed } = e as Extract<VolumeEvent, { type: 'merge-progress' }>
        return fixed
      })
      assert.deepEqual(
        progress,
        [10, 20, 30, 40, 50, 60, 70, 80, 90].map((percent) => ({ type: 'merge-progress', ...base, percent, doneBytes: (total * percent) / 100, totalBytes: total })),
      )
      assert.deepEqual(events.at(-1), { type: 'merge-done', ...base, totalBytes: total })
    } finally {
      await volume.close()
    }
  })

  it('failed: a merge whose copy into another snapshot finds the file system full emits merge-failed', async (t) => {
    // A real full file system: a small tmpfs (root only; skipped with the reason otherwise).
    await onTmpfs(4, async (mnt) => {
      let volume: Volume | null = null
      try {
        const dir = join(mnt, 'v')
        volume = await openWrittenVolume(dir) // merging needs no room for the origin
        // Fixed size: a merge shrinks a grow-on-demand COW as it goes, which would make room.
        await volume.createSnapshot('s', { chunkSizeBytes: CHUNK, cowSizeBytes: COW_CHUNKS * CHUNK })
        await overwrite(volume, 0, 20)
        await volume.createSnapshot('o', { chunkSizeBytes: CHUNK }) // grows on demand; merging s copies into it
        const events: VolumeEvent[] = []
        volume.onEvent((e) => events.push(e))
        await fillFileSystem(join(mnt, 'filler'))
        // ...but for a few pages: the merge record still fits in the manifest, 20 copied chunks do not.
        await truncate(join(mnt, 'filler'), Math.max(0, (await stat(join(mnt, 'filler'))).size - 16 * 1024))
        const merge = await volume.startMerge('s', { maxStepChunks: 1 })
        await assert.rejects(merge.done)
        const base = { volume: 'v', snapshot: 's' }
        assert.deepEqual(events[0], { type: 'merge-started', ...base, totalBytes: 20 * CHUNK, rateBytesPerSecond: null })
        const failed = events.find((e) => e.type === 'merge-failed') as Extract<VolumeEvent, { type: 'merge-failed' }> | undefined
        assert.ok(failed, `a merge-failed event: ${JSON.stringify(events)}`)
        assert.deepEqual({ volume: failed.volume, snapshot: failed.snapshot, code: failed.code }, { ...base, code: 'SNAP_NO_SPACE' })
        assert.ok(failed.reason.length > 0, 'the reason is given')
        assert.ok(!events.some((e) => e.type === 'merge-done'), 'no merge-done')
      } finally {
        await volume?.close().catch(() => {})
      }
    }, (reason) => t.skip(reason))
  })
})

describe('write-back failures', () => {
  it('the origin tells its owner about the first failed landing since the last flush', async () => {
    const device = new FaultyDevice(new MemoryDevice(64 * CHUNK))
    const origin = new Origin(device, { name: 'o' })
    const { Snapshot } = await import('../../../src/snapshot/snapshot.js')
    const { TransientStore } = await import('../../../src/store/transient-store.js')
    const snap = new Snapshot({ name: 's', store: new TransientStore(new MemoryDevice(64 * CHUNK), { chunkBytes: CHUNK }) })
    await origin.addSnapshot(snap)
    const notices: unknown[] = []
    origin.notices.on('write-back-failed', (e: { offsetBytes: number; lengthBytes: number; error: Error }) => notices.push({ ...e, error: e.error.message }))
    device.failWrites()
    await origin.write(new Uint8Array(CHUNK).fill(1), 2 * CHUNK) // held: a copy is needed first
    await assert.rejects(origin.flush(), /o: write-back of 4096 bytes at 8192 failed/)
    assert.equal(notices.length, 1)
    assert.deepEqual({ ...(notices[0] as object), error: '' }, { offsetBytes: 2 * CHUNK, lengthBytes: CHUNK, error: '' })
    assert.match((notices[0] as { error: string }).error, /./)
    // Two failed landings before the next flush: one more notice.
    await origin.write(new Uint8Array(CHUNK).fill(2), 5 * CHUNK)
    await origin.write(new Uint8Array(CHUNK).fill(2), 7 * CHUNK)
    await assert.rejects(origin.flush(), /write-back of 4096 bytes at (20480|28672) failed/)
    assert.equal(notices.length, 2, 'once per flush interval')
    device.clearFaults()
    await origin.close()
  })
})
