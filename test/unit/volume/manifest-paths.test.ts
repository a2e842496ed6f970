/**
 * The manifest cannot steer blocksnap outside the volume directory (issue 13 item 3): paths that
 * leave it are refused with one line when the volume opens, links planted in the directory are
 * not followed out of it, and COWs imported in place are used but never deleted — in the new
 * `external` form and in the form older manifests recorded them (an absolute cowFile).
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { copyFile, mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { isSnapError } from '../../../src/errors.js'
import { MANIFEST_FILE, isExternal } from '../../../src/volume/manifest.js'
import { Volume } from '../../../src/volume/volume.js'
import { checkVolumeFiles } from '../../../src/volume/check.js'
import { type Json, editManifest } from '../../support/edit-manifest.js'

const SIZE = 1024 * 1024

async function withTemp(fn: (root: string) => Promise<void>): Promise<void> {
  const root = await mkdtemp(join(tmpdir(), 'bs-manifest-paths-'))
  try {
    await fn(root)
  } finally {
    await rm(root, { recursive: true, force: true })
  }
}

/** A volume with one persistent snapshot `p`, closed. */
async function makeVolume(root: string): Promise<string> {
  const vol = join(root, 'vol')
  await Volume.create(vol, { sizeBytes: SIZE })
  const v = await Volume.open(vol)
  await v.createSnapshot('p')
  await v.origin.write(Buffer.alloc(4096, 7), 0)
  await v.close()
  return vol
}


const transient = (cowFile: string): Json => ({
  name: 't',
  chunkSizeBytes: 4096,
  store: 'transient',
  overflow: false,
  cowFile,
  cowSizeBytes: null,
  createdAt: new Date(0).toISOString(),
})

const exists = (path: string) => stat(path).then(() => true, () => false)

/** Open is refused with SNAP_CORRUPT_METADATA on one line naming `field` and `value`. */
async function assertRefused(vol: string, field: string, value: string): Promise<void> {
  await assert.rejects(Volume.open(vol), (err) => {
    assert.ok(isSnapError(err, 'SNAP_CORRUPT_METADATA'), `expected SNAP_CORRUPT_METADATA, got ${String(err)}`)
    assert.ok(!err.message.includes('\n'), 'one line')
    assert.ok(err.message.includes(field) && err.message.includes(JSON.stringify(value)), `names ${field} ${value}: ${err.message}`)
    return true
  })
  // The refusal released the lock: the volume still opens once the manifest is put right.
}

test('an originFile outside the volume is refused, and the outside file is not opened', async () => {
  await withTemp(async (root) => {
    const vol = await makeVolume(root)
    const secret = join(root, 'secret')
    await writeFile(secret, Buffer.alloc(SIZE, 0x53))
    for (const value of ['../secret', secret, 'sub/../../secret', '.', '']) {
      await editManifest(vol, (m) => {
        m.originFile = value
      })
      await assertRefused(vol, 'originFile', value)
    }
    assert.deepEqual(await readFile(secret), Buffer.alloc(SIZE, 0x53))
    await editManifest(vol, (m) => {
      m.originFile = 'origin.img'
    })
    const v = await Volume.open(vol)
    await v.close()
  })
})

test('a transient record naming a file outside the volume is refused and the file is not deleted', async () => {
  await withTemp(async (root) => {
    const vol = await makeVolume(root)
    const victim = join(root, 'victim')
    await writeFile(victim, 'keep me')
    for (const value of [victim, '../victim', 'snapshots/../../victim', 'snapshots/../origin.img', 'origin.img']) {
      await editManifest(vol, (m) => {
        m.snapshots = [...m.snapshots.filter((s) => s.name !== 't'), transient(value)]
      })
      await assertRefused(vol, 'cowFile', value)
      assert.equal(await readFile(victim, 'utf8'), 'keep me', `victim survives ${value}`)
    }
    assert.ok(await exists(join(vol, 'origin.img')))
  })
})

test('a persistent record with ../ or an unclean external path is refused', async () => {
  await withTemp(async (root) => {
    const vol = await makeVolume(root)
    await copyFile(join(vol, 'snapshots', 'p.cow'), join(root, 'p.cow'))
    for (const [value, external] of [
      ['../p.cow', undefined],
      ['snapshots/../../p.cow', undefined],
      [`${root}/../${root.split('/').pop()}/p.cow`, undefined],
      ['snapshots/p.cow', true],
    ] as const) {
      await editManifest(vol, (m) => {
        m.snapshots = [{ ...m.snapshots[0]!, cowFile: value, ...(external === undefined ? {} : { external }) }]
      })
      await assertRefused(vol, 'cowFile', value)
    }
    await editManifest(vol, (m) => {
      m.snapshots = [{ ...m.snapshots[0]!, cowFile: 'snapshots/p.cow', external: false }]
    })
    await assert.rejects(Volume.open(vol), (err) => isSnapError(err, 'SNAP_CORRUPT_METADATA') && err.message.includes('external false'))
    await editManifest(vol, (m) => {
      m.snapshots = [{ ...transient(join(root, 'p.cow')), external: true }]
    })
    await assertRefused(vol, 'cowFile', join(root, 'p.cow'))
  })
})

test('links in the volume directory are not followed out of it', async () => {
  await withTemp(async (root) => {
    const vol = await makeVolume(root)
    const outside = join(root, 'outside')
    await mkdir(outside)
    await writeFile(join(outside, 'secret.img'), Buffer.alloc(SIZE, 0x53))
    await writeFile(join(outside, 't.cow'), 'keep me')

    // origin.img -> a file outside, of the right size.
    await rm(join(vol, 'origin.img'))
    await symlink(join(outside, 'secret.img'), join(vol, 'origin.img'))
    await assert.rejects(Volume.open(vol), (err) => isSnapError(err, 'SNAP_CORRUPT_METADATA') && /leads outside the volume directory/.test(err.message))
    // A link that stays inside is fine.
    await rm(join(vol, 'origin.img'))
    await writeFile(join(vol, 'data.img'), Buffer.alloc(SIZE))
    await symlink('data.img', join(vol, 'origin.img'))
    const v = await Volume.open(vol)
    await v.close()

    // snapshots/ -> a directory outside holding the transient record's file name.
    await rm(join(vol, 'snapshots'), { recursive: true })
    await symlink(outside, join(vol, 'snapshots'))
    await editManifest(vol, (m) => {
      m.snapshots = [transient('snapshots/t.cow')]
    })
    await assert.rejects(Volume.open(vol), (err) => isSnapError(err, 'SNAP_CORRUPT_METADATA') && /leads outside/.test(err.message))
    assert.equal(await readFile(join(outside, 't.cow'), 'utf8'), 'keep me')
  })
})

test('a persistent COW that is a link to a file outside is not opened (the snapshot is broken), also not by check', async () => {
  await withTemp(async (root) => {
    const vol = await makeVolume(root)
    await copyFile(join(vol, 'snapshots', 'p.cow'), join(root, 'elsewhere.cow'))
    await rm(join(vol, 'snapshots', 'p.cow'))
    await symlink(join(root, 'elsewhere.cow'), join(vol, 'snapshots', 'p.cow'))
    const v = await Volume.open(vol)
    assert.match(v.broken('p') ?? '', /leads outside the volume directory/)
    assert.throws(() => v.snapshot('p'), (err) => isSnapError(err, 'SNAP_CORRUPT_METADATA'))
    await v.close()
    const report = await checkVolumeFiles(vol, null)
    assert.equal(report.clean, false)
    assert.match(report.problems.join('\n'), /^p: .*leads outside the volume directory/)
  })
})

test('a COW imported in place is recorded as external and never deleted: remove, reopen, merge', { timeout: 30_000 }, async () => {
  await withTemp(async (root) => {
    const vol = await makeVolume(root)
    const outsideCow = join(root, 'in-place.cow')
    await copyFile(join(vol, 'snapshots', 'p.cow'), outsideCow)
    let v = await Volume.open(vol)
    await v.removeSnapshot('p')
    await v.importSnapshot('ext', outsideCow, { inPlace: true })
    assert.equal(isExternal(v.record('ext')), true)
    assert.equal(v.cowPath(v.record('ext')), outsideCow)
    await v.close()
    const saved = JSON.parse(await readFile(join(vol, MANIFEST_FILE), 'utf8'))
    assert.deepEqual(
      saved.snapshots.map((s: Json) => [s.name, s.cowFile, s.external]),
      [['ext', outsideCow, true]],
    )

    v = await Volume.open(vol)
    await v.removeSnapshot('ext')
    await v.close()
    assert.ok(await exists(outsideCow), 'remove leaves an external COW')

    v = await Volume.open(vol)
    await v.importSnapshot('ext', outsideCow, { inPlace: true })
    const merge = await v.startMerge('ext')
    await merge.done
    while (v.records.length > 0) await new Promise((r) => setTimeout(r, 10))
    await v.close()
    assert.ok(await exists(outsideCow), 'a completed merge leaves an external COW')
  })
})

test('an older manifest that marks an in-place import by its absolute path alone still opens, as external', async () => {
  await withTemp(async (root) => {
    const vol = await makeVolume(root)
    const outsideCow = join(root, 'legacy.cow')
    await copyFile(join(vol, 'snapshots', 'p.cow'), outsideCow)
    await editManifest(vol, (m) => {
      m.snapshots = [{ ...m.snapshots[0]!, name: 'old', cowFile: outsideCow }]
      assert.equal('external' in m.snapshots[0]!, false)
    })
    const v = await Volume.open(vol)
    assert.equal(isExternal(v.record('old')), true)
    assert.equal((await v.info()).snapshots[0]!.cowPath, outsideCow)
    await v.removeSnapshot('old')
    await v.close()
    assert.ok(await exists(outsideCow), 'remove leaves the legacy in-place COW')
  })
})

test('the volume\'s own transient COWs are still cleaned up at the next open', async () => {
  await withTemp(async (root) => {
    const vol = await makeVolume(root)
    await writeFile(join(vol, 'snapshots', 't.cow'), 'stale')
    await editManifest(vol, (m) => {
      m.snapshots.push(transient('snapshots/t.cow'))
    })
    const v = await Volume.open(vol)
    assert.deepEqual(v.records.map((r) => r.name), ['p'])
    await v.close()
    assert.equal(await exists(join(vol, 'snapshots', 't.cow')), false)
  })
})

test('the manifest is not written through a link planted at its temporary name', async () => {
  await withTemp(async (root) => {
    const vol = await makeVolume(root)
    const victim = join(root, 'victim')
    await writeFile(victim, 'keep me')
    await symlink(victim, join(vol, `${MANIFEST_FILE}.tmp-${process.pid}`))
    const v = await Volume.open(vol)
    await v.createSnapshot('q')
    await v.close()
    assert.equal(await readFile(victim, 'utf8'), 'keep me')
    assert.deepEqual(JSON.parse(await readFile(join(vol, MANIFEST_FILE), 'utf8')).snapshots.map((s: Json) => s.name), ['p', 'q'])
  })
})
