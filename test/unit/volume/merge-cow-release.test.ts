/**
 * A merge of a volume's own grow-on-demand COW file truncates the chunks each committed step
 * freed, so the COW shrinks as the merge goes and deleting it at the end frees almost nothing
 * (on a file system mounted with `discard`, unlinking a 280 MiB COW took 60-120 ms). A merge
 * stopped part way leaves a shorter COW that reopens with its remaining table intact and
 * resumes to the snapshot's content. The crash cases (test/merge/merge-crash.test.ts, seed 35)
 * cover power cuts around each truncation.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, it } from 'node:test'
import { Volume } from '../../../src/volume/volume.js'
import { Random } from '../../support/random.js'

let T = ''
before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-merge-release-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

const KiB = 1024
const MiB = 1024 * KiB
const VOLUME_BYTES = 8 * MiB

async function cowBytes(volume: Volume, name: string): Promise<number> {
  const record = volume.records.find((r) => r.name === name)
  assert.ok(record, `snapshot ${name} recorded`)
  return (await stat(volume.cowPath(record))).size
}

for (const seed of [1, 2]) {
  it(`a merge shrinks its COW file step by step; stopped part way it reopens and resumes to the snapshot's content (seed ${seed})`, async () => {
    const r = new Random(seed)
    const dir = join(T, `vol${seed}`)
    await Volume.create(dir, { sizeBytes: VOLUME_BYTES })
    const snapshotContent = r.bytes(VOLUME_BYTES)
    let volume = await Volume.open(dir)
    let cowPath = ''
    let fullBytes = 0
    try {
      await volume.origin.write(snapshotContent, 0)
      await volume.createSnapshot('m', { chunkSizeBytes: 4 * KiB })
      // Sequential changes (one long run) and scattered 4 KiB ones.
      await volume.origin.write(r.bytes(3 * MiB), MiB)
      for (let i = 0; i < 200; i++) await volume.origin.write(r.bytes(4 * KiB), r.int(VOLUME_BYTES / (4 * KiB)) * 4 * KiB)
      await volume.origin.flush()
      const record = volume.records.find((x) => x.name === 'm')
      assert.ok(record)
      cowPath = volume.cowPath(record)
      fullBytes = await cowBytes(volume, 'm')
      const merge = await volume.startMerge('m', { maxStepChunks: 64 })
      // Stop once about half the table has merged.
      merge.on('progress', (p) => {
        if (p.doneChunks * 2 >= p.totalChunks) void merge.stop()
      })
      await merge.done
      assert.equal(merge.state, 'stopped')
    } finally {
      await volume.close()
    }
    const stoppedBytes = (await stat(cowPath)).size
    assert.ok(stoppedBytes < fullBytes * 0.75, `COW file ${stoppedBytes} bytes after merging half of it, ${fullBytes} before`)

    volume = await Volume.open(dir)
    try {
      assert.equal(volume.pendingMerge, 'm')
      // The merged view at once: merged chunks from the origin, the rest from the shorter COW.
      assert.deepEqual(await volume.origin.read(0, VOLUME_BYTES), snapshotContent, 'merged view after reopen')
      const merge = await volume.startMerge('m', { maxStepChunks: 64 })
      const sizes: number[] = []
      merge.on('progress', () => {
        void stat(cowPath).then(
          (s) => sizes.push(s.size),
          () => {},
        )
      })
      await merge.done
      assert.equal(merge.state, 'complete')
      assert.deepEqual(await volume.origin.read(0, VOLUME_BYTES), snapshotContent, 'origin after the resumed merge')
      assert.ok(sizes.some((s) => s < stoppedBytes), `COW file never shrank below ${stoppedBytes} bytes while resuming: ${sizes.join(', ')}`)
    } finally {
      await volume.close()
    }
    await assert.rejects(stat(cowPath), { code: 'ENOENT' })
  })
}
