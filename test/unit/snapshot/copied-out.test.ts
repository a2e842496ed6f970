/**
 * Snapshot.copiedOutChunks (the metrics copy-out count): chunks copied out of the origin into
 * the COW by origin writes, counted once each as they are published; a snapshot's own writes
 * (fresh chunks or a partial chunk's copy for its own write) are not copy-outs of origin writes
 * and chunks already saved are not copied again. Expected counts come from a set of chunks.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { Volume } from '../../../src/volume/volume.js'
import { Random } from '../../support/random.js'

const CHUNK = 4096
const SIZE = 1024 * 1024
const CHUNKS = SIZE / CHUNK

let T = ''
before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-copied-out-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

describe('Snapshot.copiedOutChunks', () => {
  for (const writeBackBytes of [0, 16 * 1024 * 1024]) {
    it(`counts each origin chunk copied out once, not the snapshot's own writes (write-back ${writeBackBytes})`, async () => {
      const dir = join(T, `v${writeBackBytes}`)
      await Volume.create(dir, { sizeBytes: SIZE })
      const volume = await Volume.open(dir, { writeBackBytes })
      try {
        await volume.createSnapshot('s', { chunkSizeBytes: CHUNK })
        const s = volume.snapshot('s')
        const random = new Random(15)
        const saved = new Set<number>() // chunks the snapshot holds
        let copiedOut = 0
        for (let i = 0; i < 120; i++) {
          const first = random.int(CHUNKS - 8)
          const count = 1 + random.int(8)
          const data = new Uint8Array(count * CHUNK).fill(i & 0xff)
          if (random.int(4) === 0) {
            // The snapshot's own write: saves the chunks, but copies nothing out for the origin.
            await s.write(data, first * CHUNK)
            for (let c = first; c < first + count; c++) saved.add(c)
          } else {
            // Unaligned by a sector at times: the chunks touched are what is copied out.
            const shift = random.int(2) * 512
            const end = Math.min(SIZE, first * CHUNK + shift + data.length)
            await volume.origin.write(data.subarray(0, end - first * CHUNK - shift), first * CHUNK + shift)
            for (let c = first; c <= Math.floor((end - 1) / CHUNK); c++) {
              if (!saved.has(c)) copiedOut++
              saved.add(c)
            }
          }
        }
        await volume.origin.flush()
        await volume.settled()
        assert.equal(s.copiedOutChunks, copiedOut)
        assert.equal(s.valid, true)
      } finally {
        await volume.close()
      }
    })
  }
})
