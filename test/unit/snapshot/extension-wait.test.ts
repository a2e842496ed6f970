/**
 * Autoextend on the callback-driven origin write path: a copy-out that finds a fixed-size COW
 * full waits for the extension in flight (an ExtensionWait among the write's waits) and looks
 * again, in write-back mode (held writes land by callbacks) as well as write-through. The
 * snapshot stays valid and reads the origin as it was; the origin reads what was written.
 * Expected bytes come from a byte-array model, not from the code.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import type { VolumeEvent } from '../../../src/volume/volume-events.js'
import { Volume } from '../../../src/volume/volume.js'
import { Random } from '../../support/random.js'

const CHUNK = 4096
const SIZE = 1024 * 1024
/** A fixed COW of 40 chunks (header and one metadata area take 2): far less than is written. */
const COW_CHUNKS = 40

let T = ''
before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-extwait-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

function originPattern(): Uint8Array {
  const bytes = new Uint8Array(SIZE)
  for (let k = 0; k < SIZE / CHUNK; k++) bytes.fill((k * 7 + 3) & 0xff, k * CHUNK, (k + 1) * CHUNK)
  return bytes
}

let counter = 0
async function run(writeBackBytes: number, seed: number): Promise<void> {
  const dir = join(T, `v${++counter}`)
  await Volume.create(dir, { sizeBytes: SIZE })
  const volume = await Volume.open(dir, { writeBackBytes })
  try {
    const before = originPattern()
    await volume.origin.write(before, 0)
    await volume.createSnapshot('s', { chunkSizeBytes: CHUNK, cowSizeBytes: COW_CHUNKS * CHUNK, autoextendThresholdPercent: 70, autoextendPercent: 20 })
    const events: VolumeEvent[] = []
    volume.onEvent((e) => events.push(e))
    // 160 distinct chunks in random order, every write issued at once (none awaited before
    // the next starts): many copies meet the full COW while an extension is in flight.
    const random = new Random(seed)
    const chunks = Array.from({ length: 160 }, (_, k) => k)
    for (let i = chunks.length - 1; i > 0; i--) {
      const j = random.int(i + 1)
      ;[chunks[i], chunks[j]] = [chunks[j]!, chunks[i]!]
    }
    const model = before.slice()
    const writes: Array<Promise<void>> = []
    for (const c of chunks) {
      const data = new Uint8Array(CHUNK).fill((c + 0x80) & 0xff)
      model.set(data, c * CHUNK)
      writes.push(volume.origin.write(data, c * CHUNK))
    }
    await Promise.all(writes)
    await volume.origin.flush()
    await volume.settled()
    const s = volume.snapshot('s')
    assert.equal(s.valid, true, 'the snapshot stays valid')
    assert.ok(!events.some((e) => e.type === 'snapshot-invalidated'), `no invalidation: ${JSON.stringify(events.map((e) => e.type))}`)
    assert.ok(events.some((e) => e.type === 'cow-extended'), 'the COW was extended')
    assert.ok(Buffer.from(await s.read(0, SIZE)).equals(Buffer.from(before)), 'the snapshot reads the origin as it was')
    assert.ok(Buffer.from(await volume.origin.read(0, SIZE)).equals(Buffer.from(model)), 'the origin reads what was written')
  } finally {
    await volume.close()
  }
}

describe('autoextend on the callback-driven origin write path', () => {
  it('write-back: held writes whose copies meet a full COW wait for the extension and land', async () => {
    await run(64 * 1024 * 1024, 2024)
  })
  it('write-through: the same writes, each answered once on the device', async () => {
    await run(0, 2025)
  })
})
