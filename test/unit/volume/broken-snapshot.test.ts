/**
 * A broken snapshot is isolated (issue 14, item 2), through the Volume API: a volume whose
 * snapshot COW is corrupt, truncated or missing opens; the origin and the other snapshots read
 * as their byte models say; reads of the broken one fail naming it; origin writes, discards and
 * merges are refused naming it and the way out, without changing a byte on disk; removing it
 * needs `force`, after which the origin is writable again. A recorded merge is not resumed while
 * a snapshot is broken, and the origin (then a partly merged mix) refuses reads as well.
 */
import assert from 'node:assert/strict'
import { access, mkdtemp, open, readFile, rename, rm, truncate, unlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { VolumeExports } from '../../../src/cli/volume-exports.js'
import { isSnapError } from '../../../src/errors.js'
import { isRefused } from '../../../src/nbd/export.js'
import type { Merge } from '../../../src/merge/merge.js'
import { MANIFEST_FILE } from '../../../src/volume/manifest.js'
import { Volume } from '../../../src/volume/volume.js'
import { assertBytes, assertUnchanged, fingerprint, pattern } from '../../cli/helpers.js'
import { poke } from '../../support/poke.js'

const KiB = 1024
const SIZE = 1024 * KiB
const SECTORS = SIZE / 512

let T = ''
before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-broken-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

const exists = (p: string) => access(p).then(
  () => true,
  () => false,
)


/** Asserts `promise` rejects with SnapError `code` whose message matches every pattern. */
async function rejects(promise: Promise<unknown>, code: string, ...patterns: RegExp[]): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(isSnapError(err), `not a SnapError: ${String(err)}`)
    assert.equal(err.code, code, err.message)
    for (const p of patterns) assert.match(err.message, p)
    assert.doesNotMatch(err.message, /\n/, 'one line')
    return true
  })
}

interface Models {
  origin: Buffer
  snaps: Map<string, Buffer>
}

/**
 * Volume `vol` with snapshots taken between origin writes, each given name in `names` in turn;
 * every later write lands on chunks all snapshots share, so each holds copies. Returns models.
 */
async function makeVolume(vol: string, names: readonly string[], seed: number): Promise<Models> {
  await Volume.create(vol, { sizeBytes: SIZE })
  const volume = await Volume.open(vol)
  const origin = pattern(SIZE, seed)
  const snaps = new Map<string, Buffer>()
  try {
    await volume.origin.write(origin, 0)
    for (const [i, name] of names.entries()) {
      await volume.createSnapshot(name)
      snaps.set(name, Buffer.from(origin))
      const data = pattern(96 * KiB, seed + i + 1)
      const at = i * 64 * KiB + 512 // overlaps the previous write's chunks, unaligned
      await volume.origin.write(data, at)
      data.copy(origin, at)
    }
    await volume.flush()
  } finally {
    await volume.close()
  }
  return { origin, snaps }
}

async function assertViews(volume: Volume, models: Models, skip: string, what: string): Promise<void> {
  assertBytes(await volume.origin.read(0, SIZE), models.origin, `${what}: origin`)
  for (const [name, model] of models.snaps) {
    if (name !== skip) assertBytes(await volume.snapshot(name).read(0, SIZE), model, `${what}: ${name}`)
  }
}

const damages: [string, (cow: string) => Promise<void>, RegExp][] = [
  ['bad header magic', (cow) => poke(cow, 0, Buffer.from('XXXX')), /bad magic 0x58585858 in vol-0\/snapshots\/bad\.cow/],
  ['truncated inside the header', (cow) => truncate(cow, 100), /no snapshot header \(truncated or overwritten\) in vol-1\/snapshots\/bad\.cow/],
  ['truncated before the first metadata area', (cow) => truncate(cow, 4096), /metadata area 0 .*beyond the end.* in vol-2\/snapshots\/bad\.cow/],
  ['missing COW file', (cow) => unlink(cow), /COW file vol-3\/snapshots\/bad\.cow is missing/],
]

describe('broken snapshot (Volume API)', () => {
  damages.forEach(([what, damage, reason], i) => {
    it(`${what}: the volume opens, everything else reads, origin writes and merges are refused until remove --force`, async () => {
      const vol = join(T, `vol-${i}`)
      const models = await makeVolume(vol, ['a', 'bad', 'c'], 100 + i)
      const cow = join(vol, 'snapshots', 'bad.cow')
      await damage(cow)

      let volume = await Volume.open(vol)
      try {
        await assertViews(volume, models, 'bad', what)
        await rejects(Promise.resolve().then(() => volume.snapshot('bad').read(0, 512)), 'SNAP_CORRUPT_METADATA', new RegExp(`snapshot vol-${i}@bad is broken: `), reason)
        assert.match(volume.broken('bad') ?? '', reason)
        assert.equal(volume.broken('a'), null)

        const info = await volume.info()
        assert.deepEqual(
          info.snapshots.map((s) => [s.name, s.state, s.reason === null ? null : 'reason']),
          [['a', 'active', null], ['bad', 'broken', 'reason'], ['c', 'active', null]],
        )
        assert.match(info.snapshots[1]?.reason ?? '', reason)
        assert.equal(volume.statusLine('bad'), `0 ${SECTORS} snapshot Broken`)
        // Served: the rest is exported; the broken one is refused (NBD_REP_ERR_POLICY) with the reason.
        const exports = new VolumeExports([volume])
        assert.deepEqual(exports.list().map((e) => e.name), [`vol-${i}`, `vol-${i}@a`, `vol-${i}@c`])
        const refused = exports.get(`vol-${i}@bad`)
        assert.ok(isRefused(refused), 'the broken snapshot export is refused, not unknown')
        assert.match(refused.refused, reason)
        assert.match(volume.statusLine('a'), /^0 2048 snapshot \d+\/\d+ \d+$/)

        // Everything refused leaves every byte where it was.
        const before = await fingerprint(vol)
        const way = `repair it, or drop it with \`blocksnap remove vol-${i}@bad --force\``
        const refusal = new RegExp(`^origin writes are refused: snapshot vol-${i}@bad is broken \\(.*\\); ${way.replace(/[()`@-]/g, '\\$&')}$`)
        await rejects(volume.origin.write(pattern(4096, 1), 0), 'SNAP_READ_ONLY', refusal, reason)
        await rejects(volume.origin.write(pattern(512, 2), SIZE - 512, { fua: true }), 'SNAP_READ_ONLY', refusal)
        await rejects(volume.origin.discard(0, 8192), 'SNAP_READ_ONLY', refusal)
        await rejects(volume.startMerge('a'), 'SNAP_MERGE_REFUSED', new RegExp(`^merges are refused: snapshot vol-${i}@bad is broken`))
        await rejects(volume.startMerge('bad'), 'SNAP_MERGE_REFUSED', /merges are refused/)
        await rejects(volume.removeSnapshot('bad'), 'SNAP_CORRUPT_METADATA', /may be repairable/, /--force/)
        await volume.flush()
        await assertUnchanged(vol, before, `${what}: refused operations`)
        await assertViews(volume, models, 'bad', `${what}, after the refusals`)

        // Snapshot writes to a healthy snapshot and new snapshots do not touch origin data.
        const mine = pattern(8192, 3)
        await volume.snapshot('a').write(mine, 4096)
        mine.copy(models.snaps.get('a') as Buffer, 4096)
        await volume.createSnapshot('d')
        models.snaps.set('d', Buffer.from(models.origin))
        await assertViews(volume, models, 'bad', `${what}, after a snapshot write and a new snapshot`)

        await volume.removeSnapshot('bad', { force: true })
        assert.equal(await exists(cow), false, 'the COW inside the volume is deleted')
        assert.equal(volume.broken('bad'), null)
        assert.deepEqual(volume.records.map((r) => r.name), ['a', 'c', 'd'])
        // Writable again, and the copies go to every remaining snapshot.
        const later = pattern(64 * KiB, 4)
        await volume.origin.write(later, 128 * KiB)
        later.copy(models.origin, 128 * KiB)
        models.snaps.delete('bad')
        await assertViews(volume, models, '', `${what}, after remove --force and an origin write`)
      } finally {
        await volume.close()
      }
      volume = await Volume.open(vol)
      try {
        assert.deepEqual((await volume.info()).snapshots.map((s) => s.state), ['active', 'active', 'active'])
        await assertViews(volume, models, '', `${what}, reopened`)
      } finally {
        await volume.close()
      }
    })
  })

  // As `import --in-place` recorded it before the `external` field (an absolute path). A relative
  // path leading out of the volume is refused when the manifest is read (manifest-paths.test.ts).
  const outside: [string, (far: string) => string][] = [['an absolute path', (far) => far]]
  outside.forEach(([how, recorded], i) => it(`remove --force keeps a broken COW outside the volume directory (${how})`, async () => {
    const vol = join(T, `outside-${i}`)
    const models = await makeVolume(vol, ['a', 'far'], 200)
    const far = join(T, `outside-${i}-far.cow`)
    await rename(join(vol, 'snapshots', 'far.cow'), far)
    const manifestPath = join(vol, MANIFEST_FILE)
    const manifest = JSON.parse(await readFile(manifestPath, 'utf8')) as { snapshots: { name: string; cowFile: string }[] }
    for (const s of manifest.snapshots) if (s.name === 'far') s.cowFile = recorded(far)
    await writeFile(manifestPath, JSON.stringify(manifest))
    await poke(far, 0, Buffer.from('XXXX'))
    const farBytes = await readFile(far)

    const volume = await Volume.open(vol)
    try {
      assert.notEqual(volume.broken('far'), null)
      if (i === 0) assert.match(volume.broken('far') ?? '', new RegExp(`bad magic 0x58585858 in ${far.replace(/[.]/g, '\\.')}`))
      await rejects(volume.removeSnapshot('far'), 'SNAP_CORRUPT_METADATA', /--force/)
      await volume.removeSnapshot('far', { force: true })
      assert.deepEqual(volume.records.map((r) => r.name), ['a'])
      assertBytes(await readFile(far), farBytes, 'the COW outside the volume is left alone')
      models.snaps.delete('far')
      await volume.origin.write(pattern(4096, 5), 0)
      pattern(4096, 5).copy(models.origin, 0)
      await assertViews(volume, models, '', 'after removing the outside COW')
    } finally {
      await volume.close()
    }
  }))

  it('a recorded merge of a broken snapshot is not resumed: origin I/O refused, remove --force drops the merge', async () => {
    const vol = join(T, 'merge-broken')
    const models = await makeVolume(vol, ['a', 's'], 300)
    let volume = await Volume.open(vol)
    await volume.setPendingMerge('s') // as a merge interrupted before its first step leaves it
    await volume.close()
    await poke(join(vol, 'snapshots', 's.cow'), 0, Buffer.from('XXXX'))

    volume = await Volume.open(vol)
    try {
      assert.equal(volume.merge, null, 'the merge is not resumed')
      assert.equal(volume.pendingMerge, 's', 'it stays recorded')
      assert.deepEqual((await volume.info()).merge, { snapshot: 's', doneChunks: 0, totalChunks: 0 })
      const before = await fingerprint(vol)
      const unreadable = /^origin of merge-broken is unreadable: its merge of merge-broken@s cannot resume: snapshot merge-broken@s is broken \(bad magic 0x58585858 in merge-broken\/snapshots\/s\.cow\); repair it, or drop it with `blocksnap remove merge-broken@s --force`$/
      await rejects(volume.origin.read(0, 4096), 'SNAP_IO', unreadable)
      await rejects(volume.origin.write(pattern(512, 6), 0), 'SNAP_READ_ONLY', unreadable)
      await rejects(volume.createSnapshot('new'), 'SNAP_BUSY', /merge of merge-broken@s waits/)
      await rejects(volume.removeSnapshot('s'), 'SNAP_CORRUPT_METADATA', /--force/)
      assertBytes(await volume.snapshot('a').read(0, SIZE), models.snaps.get('a') as Buffer, 'snapshot a')
      await assertUnchanged(vol, before, 'refused operations during an unresumable merge')

      await volume.removeSnapshot('s', { force: true })
      assert.equal(volume.pendingMerge, null, 'the merge record goes with it')
      // Nothing had been merged: the origin is as it was.
      models.snaps.delete('s')
      await assertViews(volume, models, '', 'after dropping the merge')
      await volume.origin.write(pattern(512, 7), 0)
    } finally {
      await volume.close()
    }
  })

  it('a recorded merge of a healthy snapshot waits for a broken one, then is presented again once it is removed, and resumes when asked', async () => {
    const vol = join(T, 'merge-waits')
    const models = await makeVolume(vol, ['s', 'bad'], 400)
    let volume = await Volume.open(vol)
    await volume.setPendingMerge('s')
    await volume.close()
    await truncate(join(vol, 'snapshots', 'bad.cow'), 0)

    volume = await Volume.open(vol)
    try {
      assert.equal(volume.merge, null, 'not resumed while bad is broken')
      const before = await fingerprint(vol)
      await rejects(volume.origin.read(0, 512), 'SNAP_IO', /its merge of merge-waits@s cannot resume: snapshot merge-waits@bad is broken/)
      await rejects(volume.startMerge('s'), 'SNAP_MERGE_REFUSED', /merges are refused: snapshot merge-waits@bad/)
      await assertUnchanged(vol, before, 'refused operations')

      await volume.removeSnapshot('bad', { force: true })
      // The broken snapshot gone, the recorded merge is presented again (the merged view reads),
      // and moves on when asked, as after any open.
      assert.equal(volume.merge as Merge | null, null, 'presented, not resumed')
      assertBytes(await volume.origin.read(0, SIZE), models.snaps.get('s') as Buffer, 'the origin presents the merged view')
      const merge = await volume.resumeMerge()
      assert.ok(merge, 'the merge resumes when asked')
      await merge.done
      assert.equal(merge.state, 'complete')
      assertBytes(await volume.origin.read(0, SIZE), models.snaps.get('s') as Buffer, 'origin rolled back to s')
      assert.equal(volume.pendingMerge, null, 'the merge record is dropped')
      assert.deepEqual(volume.records.map((r) => r.name), [])
    } finally {
      await volume.close()
    }
  })
})
