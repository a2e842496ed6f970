/**
 * export-diff / import-diff in process, against byte-array models:
 * - a full stream, then two incremental ones, applied to a replica (which held garbage and has a
 *   snapshot of its own) make its origin equal each point in time, and record each snapshot;
 * - incremental streams are about the size of the changed bytes;
 * - a replica written since A refuses the incremental stream (unchanged), --force applies it;
 * - every single-byte flip, every truncation, appended bytes, reordered records and a
 *   wrong-size stream are refused and leave the replica's files exactly as they were.
 */
import assert from 'node:assert/strict'
import { mkdtemp, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { isSnapError } from '../../src/errors.js'
import { localOps } from '../../src/control/volume-ops.js'
import { DiffStreamWriter } from '../../src/backup/diff-stream.js'
import { type ExportSummary, exportDiff } from '../../src/backup/export-diff.js'
import { type ImportOptions, type ImportSummary, applyDiffStream, stageDiffStream, stagePath } from '../../src/backup/import-diff.js'
import { Volume } from '../../src/volume/volume.js'
import { Random } from '../support/random.js'
import { assertBytes, fingerprint } from '../cli/helpers.js'

const SIZE = 2 * 1024 * 1024
let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-export-diff-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

async function withVolume<R>(dir: string, fn: (v: Volume) => Promise<R>): Promise<R> {
  const v = await Volume.open(dir)
  try {
    return await fn(v)
  } finally {
    await v.close()
  }
}

async function exportBytes(dir: string, to: string, from: string | null): Promise<{ bytes: Buffer; summary: ExportSummary }> {
  const pieces: Uint8Array[] = []
  const summary = await withVolume(dir, (v) =>
    exportDiff(localOps(v), to, from, async (b) => {
      pieces.push(Buffer.from(b))
    }),
  )
  return { bytes: Buffer.concat(pieces), summary }
}

/** The stream in pieces of odd sizes, as a pipe delivers it. */
async function* piecesOf(bytes: Uint8Array, pieceBytes = 1000): AsyncIterable<Uint8Array> {
  for (let i = 0; i < bytes.length; i += pieceBytes) yield bytes.subarray(i, i + pieceBytes)
}

/** What `import-diff` does: stage and verify, then apply. */
async function importBytes(dir: string, bytes: Uint8Array, options: ImportOptions = {}): Promise<ImportSummary> {
  const staged = await stageDiffStream(piecesOf(bytes), stagePath(dir))
  try {
    return await withVolume(dir, (v) => applyDiffStream(v, staged, options))
  } finally {
    await rm(staged.path, { force: true })
  }
}

async function originOf(dir: string): Promise<Uint8Array> {
  return withVolume(dir, (v) => v.origin.read(0, v.sizeBytes))
}

async function refused(what: string, run: () => Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(run, (err: unknown) => {
    assert.ok(isSnapError(err), `${what}: not a SnapError: ${String(err)}`)
    assert.match(err.message, pattern, what)
    assert.ok(!err.message.includes('\n'), `${what}: one line`)
    return true
  })
}

/** Streams of the source built in the first test, used by the refusal tests. */
const streams = new Map<string, Buffer>()
let src = ''
let replica = ''

test('export-diff/import-diff: a full stream and two incremental ones bring a replica to each point in time', async () => {
  const rnd = new Random(17)
  src = join(T, 'src')
  replica = join(T, 'replica')
  await Volume.create(src, { sizeBytes: SIZE })
  await Volume.create(replica, { sizeBytes: SIZE })
  const model = Buffer.alloc(SIZE)
  const writeSrc = async (count: number) => {
    await withVolume(src, async (v) => {
      for (let i = 0; i < count; i++) {
        const length = 1 + rnd.int(20000)
        const offset = rnd.int(SIZE - length)
        const data = rnd.chance(0.2) ? new Uint8Array(length) : rnd.bytes(length) // some zero extents
        await v.origin.write(data, offset)
        model.set(data, offset)
      }
      await v.flush()
    })
  }
  // The replica holds garbage and a snapshot of its own: a full import overrides the garbage,
  // and the replica's snapshot keeps its view.
  const garbage = rnd.bytes(SIZE)
  await withVolume(replica, async (v) => {
    await v.origin.write(garbage, 0)
    await v.createSnapshot('own', { chunkSizeBytes: 8192 })
  })

  await writeSrc(30)
  await withVolume(src, (v) => v.createSnapshot('s1', { chunkSizeBytes: 4096 }))
  const s1 = Buffer.from(model)
  const full = await exportBytes(src, 's1', null)
  streams.set('full', full.bytes)
  assert.equal(full.summary.changedBytes, SIZE)
  const r1 = await importBytes(replica, full.bytes)
  assert.equal(r1.to, 's1')
  assertBytes(await originOf(replica), s1, 'replica origin after the full stream')

  await writeSrc(10)
  await withVolume(src, (v) => v.createSnapshot('s2', { chunkSizeBytes: 1024 }))
  const s2 = Buffer.from(model)
  const inc2 = await exportBytes(src, 's2', 's1')
  streams.set('inc2', inc2.bytes)
  await importBytes(replica, inc2.bytes)
  assertBytes(await originOf(replica), s2, 'replica origin after the first incremental stream')

  // Writes on the source snapshot s2 itself change nothing of s3, which is taken from the origin.
  await writeSrc(5)
  await withVolume(src, async (v) => {
    await v.snapshot('s2').write(new Uint8Array(5000).fill(0xee), 100)
    await v.createSnapshot('s3', { chunkSizeBytes: 16384 })
  })
  const s3 = Buffer.from(model)
  const inc3 = await exportBytes(src, 's3', 's2')
  await importBytes(replica, inc3.bytes)
  assertBytes(await originOf(replica), s3, 'replica origin after the second incremental stream')

  await withVolume(replica, async (v) => {
    assert.deepEqual(v.records.map((r) => r.name), ['own', 's1', 's2', 's3'])
    assertBytes(await v.snapshot('s1').read(0, SIZE), s1, 'replica snapshot s1')
    assertBytes(await v.snapshot('s2').read(0, SIZE), s2, 'replica snapshot s2')
    assertBytes(await v.snapshot('own').read(0, SIZE), garbage, 'the replica snapshot taken before the imports')
  })
  // An incremental stream is the changed bytes plus per-record overhead (about 100 bytes each
  // with the header and trailer), far below the volume's size.
  for (const inc of [inc2, inc3]) {
    const s = inc.summary
    assert.ok(s.changedBytes < SIZE / 2, `changed ${s.changedBytes}`)
    assert.ok(s.streamBytes <= s.dataBytes + 64 * 1024, `stream ${s.streamBytes} bytes for ${s.dataBytes} bytes of data`)
    assert.equal(s.streamBytes, inc.bytes.length)
  }
  // A diff at granule level: what s2 -> s3 carries is what differs, checked against the models.
  let differing = 0
  for (let i = 0; i < SIZE; i++) if (s2[i] !== s3[i]) differing++
  assert.ok(inc3.summary.changedBytes >= differing && inc3.summary.changedBytes < differing + 64 * 1024)
})

test('import-diff: an incremental stream needs an unchanged snapshot A on the target, unless --force', async () => {
  const inc = streams.get('inc2') as Buffer
  const target = join(T, 'changed')
  await Volume.create(target, { sizeBytes: SIZE })
  await importBytes(target, streams.get('full') as Buffer)
  await withVolume(target, (v) => v.origin.write(new Uint8Array([1, 2, 3]), 4096 * 100))
  const before = await fingerprint(target)
  await refused('written since A', () => importBytes(target, inc), /has changed since snapshot s1 \(1 chunk written since\).*--force/)
  assert.deepEqual(await fingerprint(target), before, 'a refused import changed the target')
  await withVolume(target, (v) => v.removeSnapshot('s1'))
  const without = await fingerprint(target)
  await refused('no snapshot A', () => importBytes(target, inc), /holds no snapshot 's1'/)
  assert.deepEqual(await fingerprint(target), without)
  // --force: the stream's extents are written all the same.
  await importBytes(target, inc, { force: true })
  await withVolume(target, async (v) => {
    assertBytes(await v.origin.read(0, SIZE), await v.snapshot('s2').read(0, SIZE), 'target origin equals its new s2')
  })
  // B already there: refused.
  const again = await fingerprint(target)
  await refused('B exists', () => importBytes(target, inc, { force: true }), /already holds a snapshot named 's2'/)
  assert.deepEqual(await fingerprint(target), again)
})

/** A small stream of a small volume: a full stream with data and zero records. */
async function smallStream(): Promise<{ dir: string; bytes: Buffer }> {
  const dir = join(T, 'small')
  await Volume.create(dir, { sizeBytes: 64 * 1024 })
  await withVolume(dir, async (v) => {
    await v.origin.write(new Uint8Array(700).fill(5), 1000)
    await v.origin.write(new Uint8Array(30).fill(6), 40000)
    await v.createSnapshot('b', { chunkSizeBytes: 512 })
  })
  return { dir, bytes: (await exportBytes(dir, 'b', null)).bytes }
}

test('import-diff: every flipped byte, every truncation and appended bytes are refused, the replica unchanged', async () => {
  const { bytes } = await smallStream()
  const target = join(T, 'small-replica')
  await Volume.create(target, { sizeBytes: 64 * 1024 })
  await withVolume(target, async (v) => {
    await v.origin.write(new Uint8Array(4096).fill(9), 8192)
    await v.createSnapshot('mine')
    await v.origin.write(new Uint8Array(100).fill(3), 0)
  })
  const before = await fingerprint(target)
  assert.ok(bytes.length < 4096, `a small stream (${bytes.length} bytes)`)
  for (let i = 0; i < bytes.length; i++) {
    const bad = Buffer.from(bytes)
    bad[i] = (bad[i] as number) ^ (1 << i % 8)
    await refused(`flip at ${i}`, () => importBytes(target, bad), /^invalid or corrupt diff stream: /)
  }
  for (let n = 0; n < bytes.length; n++) {
    await refused(`truncated to ${n}`, () => importBytes(target, bytes.subarray(0, n)), /^invalid or corrupt diff stream: /)
  }
  await refused('appended', () => importBytes(target, Buffer.concat([bytes, Buffer.from([0])])), /data after the trailer/)
  assert.deepEqual(await fingerprint(target), before, 'a refused stream changed the replica')
  assert.deepEqual((await readdir(target)).filter((n) => n.includes('stage')), [], 'no staging file left')
  // The intact stream applies.
  await importBytes(target, bytes)
  assertBytes(await originOf(target), await originOf(join(T, 'small')), 'the intact stream')
})

test('import-diff: records out of order (checksums intact) and a wrong-size stream are refused, the replica unchanged', async () => {
  const target = join(T, 'order-replica')
  await Volume.create(target, { sizeBytes: 64 * 1024 })
  const before = await fingerprint(target)
  const build = async (size: number, records: Array<[number, number]>): Promise<Buffer> => {
    const out: Buffer[] = []
    const w = new DiffStreamWriter(async (b) => {
      out.push(Buffer.from(b))
    })
    await w.header({ sizeBytes: size, from: 'a', to: 'b', granularityBytes: 4096, chunkSizeBytes: 4096 })
    for (const [offset, length] of records) await w.data(offset, new Uint8Array(length).fill(1))
    await w.trailer()
    return Buffer.concat(out)
  }
  await refused('empty', () => importBytes(target, Buffer.alloc(0)), /empty input/)
  const reordered = await build(64 * 1024, [
    [8192, 4096],
    [0, 4096],
  ])
  await refused('reordered', () => importBytes(target, reordered, { force: true }), /out of order/)
  const overlapping = await build(64 * 1024, [
    [0, 8192],
    [4096, 4096],
  ])
  await refused('overlapping', () => importBytes(target, overlapping, { force: true }), /out of order/)
  const beyond = await build(64 * 1024, [[61440, 8192]])
  await refused('beyond the end', () => importBytes(target, beyond, { force: true }), /beyond the volume size/)
  const wrongSize = await build(128 * 1024, [[0, 4096]])
  await refused('wrong size', () => importBytes(target, wrongSize, { force: true }), /stream is for a volume of 131072 bytes; order-replica has 65536/)
  // Two valid streams spliced: the second one's records follow the first one's header.
  const a = await build(64 * 1024, [[0, 4096]])
  const b = await build(64 * 1024, [[8192, 4096]])
  const recordBytes = 32 + 4096 + 32
  const headerBytes = a.length - recordBytes - (32 + 32 + 32)
  const spliced = Buffer.concat([a.subarray(0, headerBytes + recordBytes), b.subarray(headerBytes + recordBytes)])
  await refused('spliced', () => importBytes(target, spliced, { force: true }), /trailer .* does not match|fails its checksum/)
  assert.deepEqual(await fingerprint(target), before, 'a refused stream changed the replica')
})
