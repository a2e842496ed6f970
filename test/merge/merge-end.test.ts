/**
 * Issue 14 item 6: merges always end. A merge of a snapshot holding no exceptions (or whose
 * last exceptions were merged before a crash) completes at once in the running process: the
 * snapshot is gone from the manifest, the volume is active again, and whoever waits for the
 * merge (its `done`, its 'complete' event) finds the volume already updated.
 *
 * In process, through the Volume API (what the CLI and serve call).
 */
import assert from 'node:assert/strict'
import { access, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { readManifest } from '../../src/volume/manifest.js'
import { Volume } from '../../src/volume/volume.js'
import { assertSameBytes } from './merge-support.js'

const MiB = 1024 * 1024

let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-merge-end-'))
})

after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

const exists = (p: string) => access(p).then(
  () => true,
  () => false,
)

/** The volume has forgotten snapshot `name` everywhere: in memory, in the manifest, on disk. */
async function assertMergedAway(volume: Volume, name: string, what: string): Promise<void> {
  assert.equal(volume.merge, null, `${what}: no merge left`)
  assert.equal(volume.pendingMerge, null, `${what}: no merge pending`)
  assert.equal((await volume.info()).merge, null, `${what}: list shows no merge`)
  assert.ok(!volume.records.some((r) => r.name === name), `${what}: ${name} still listed`)
  assert.equal(volume.statusLine(null), '0 2048 snapshot-origin', `${what}: the origin is active again`)
  const manifest = await readManifest(volume.dir)
  assert.equal(manifest.merge, null, `${what}: manifest still records the merge`)
  assert.ok(!manifest.snapshots.some((r) => r.name === name), `${what}: manifest still lists ${name}`)
  assert.equal(await exists(join(volume.dir, 'snapshots', `${name}.cow`)), false, `${what}: COW file left behind`)
}

async function freshVolume(name: string): Promise<Volume> {
  const dir = join(T, name)
  await Volume.create(dir, { sizeBytes: MiB })
  return Volume.open(dir)
}

test('merging a snapshot taken just now (no exceptions) ends at once', async () => {
  const volume = await freshVolume('empty')
  try {
    await volume.createSnapshot('s')
    const merge = await volume.startMerge('s')
    let updatedAtEvent: boolean | null = null
    merge.once('complete', () => {
      updatedAtEvent = !volume.records.some((r) => r.name === 's')
    })
    await merge.done
    assert.equal(merge.state, 'complete')
    assert.equal(updatedAtEvent, true, "'complete' fires once the volume has forgotten the snapshot")
    await assertMergedAway(volume, 's', 'empty merge')
    // The volume is usable as before: a new snapshot of the same name can be taken.
    await volume.createSnapshot('s')
  } finally {
    await volume.close()
  }
})

test('merging a one-chunk snapshot ends and rolls that chunk back', async () => {
  const volume = await freshVolume('one')
  try {
    const before = await volume.origin.read(0, MiB)
    await volume.createSnapshot('s', { chunkSizeBytes: 65536 })
    await volume.origin.write(new Uint8Array(512).fill(9), 70000)
    await volume.flush()
    assert.equal(volume.snapshot('s').table.size, 1)
    const merge = await volume.startMerge('s')
    await merge.done
    assert.equal(merge.state, 'complete')
    assertSameBytes(await volume.origin.read(0, MiB), before, 'origin after the merge')
    await assertMergedAway(volume, 's', 'one-chunk merge')
  } finally {
    await volume.close()
  }
})

test('a merge whose last exceptions were merged before a crash ends when resumed', async () => {
  const dir = join(T, 'crashed')
  await Volume.create(dir, { sizeBytes: MiB })
  let volume = await Volume.open(dir)
  // The state a crash between the last commit and forgetting the snapshot leaves: the manifest
  // records the merge, the snapshot's COW holds no exceptions.
  await volume.createSnapshot('s')
  await volume.setPendingMerge('s')
  await volume.close()
  volume = await Volume.open(dir)
  try {
    assert.deepEqual((await volume.info()).merge, { snapshot: 's', doneChunks: 0, totalChunks: 0 })
    const merge = await volume.resumeMerge()
    assert.ok(merge)
    await merge.done
    assert.equal(merge.state, 'complete')
    await assertMergedAway(volume, 's', 'resumed empty merge')
  } finally {
    await volume.close()
  }
})

test('a merge refused before it starts leaves nothing recorded', async () => {
  const volume = await freshVolume('refused')
  try {
    await volume.createSnapshot('s', { cowSizeBytes: 3 * 4096 })
    // Fill the fixed COW past its one data chunk: the snapshot is invalid, a merge is refused.
    await volume.origin.write(new Uint8Array(3 * 4096).fill(1), 0)
    await volume.flush()
    assert.equal(volume.snapshot('s').state, 'invalid')
    await assert.rejects(volume.startMerge('s'), /invalid/)
    assert.equal(volume.pendingMerge, null)
    assert.equal((await readManifest(volume.dir)).merge, null)
    await volume.removeSnapshot('s')
  } finally {
    await volume.close()
  }
})
