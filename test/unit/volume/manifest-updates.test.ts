/**
 * Snapshot operations that run at once on a served volume (creates and removes from several
 * control clients, a merge that ends meanwhile) each change the manifest. Found by the soak
 * (seed 3): a merge's end and a remove both rewrote volume.json through the same temporary
 * file, so one failed with ENOENT (the merge then "failed" and its snapshot stayed listed),
 * and each wrote a manifest computed before the other's: one change was lost, which could
 * bring a removed snapshot back, without its COW file, at the next open.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, it } from 'node:test'
import { readManifest } from '../../../src/volume/manifest.js'
import { Volume } from '../../../src/volume/volume.js'

let T = ''
before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-manifest-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

const names = (v: Volume) => v.records.map((r) => r.name).sort()

it('creates and removes run at once: every one lands in the manifest', async () => {
  const dir = join(T, 'concurrent')
  await Volume.create(dir, { sizeBytes: 1024 * 1024 })
  const volume = await Volume.open(dir)
  try {
    for (const n of ['a', 'b', 'c']) await volume.createSnapshot(n)
    await Promise.all([
      volume.removeSnapshot('a'),
      volume.removeSnapshot('b'),
      volume.createSnapshot('d'),
      volume.createSnapshot('e'),
      volume.removeSnapshot('c'),
    ])
    assert.deepEqual(names(volume), ['d', 'e'])
    assert.deepEqual((await readManifest(dir)).snapshots.map((r) => r.name).sort(), ['d', 'e'])
  } finally {
    await volume.close()
  }
  const reopened = await Volume.open(dir)
  try {
    assert.deepEqual(names(reopened), ['d', 'e'])
    assert.deepEqual((await reopened.info()).snapshots.map((s) => s.state), ['active', 'active'])
  } finally {
    await reopened.close()
  }
})

it('a merge that ends while other snapshots are removed loses no change', async () => {
  const dir = join(T, 'merge')
  await Volume.create(dir, { sizeBytes: 1024 * 1024 })
  const volume = await Volume.open(dir)
  try {
    await volume.createSnapshot('m')
    await volume.createSnapshot('gone')
    await volume.createSnapshot('gone2')
    await volume.createSnapshot('kept')
    await volume.origin.write(new Uint8Array(64 * 1024).fill(7), 0)
    const merge = await volume.startMerge('m')
    await Promise.all([merge.done, volume.removeSnapshot('gone'), volume.removeSnapshot('gone2')])
    assert.equal(merge.state, 'complete')
    assert.deepEqual(names(volume), ['kept'])
    const manifest = await readManifest(dir)
    assert.deepEqual(manifest.snapshots.map((r) => r.name), ['kept'])
    assert.equal(manifest.merge ?? null, null)
  } finally {
    await volume.close()
  }
})
