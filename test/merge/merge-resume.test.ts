/**
 * Issue 12 item 6: a pending merge resumes only when asked (the `merge` command, `serve`), at
 * the rate recorded in the manifest. Opening the volume for anything else (list, status, read,
 * write) presents the merged view without moving a byte of the merge.
 *
 * In process, through the Volume API every CLI command goes through (Volume.open).
 */
import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { readManifest } from '../../src/volume/manifest.js'
import { Volume } from '../../src/volume/volume.js'
import { assertSameBytes } from './merge-support.js'

const MiB = 1024 * 1024
const SIZE = 4 * MiB
/** Slow enough that a merge stopped at once has most of its 512 chunks left. */
const RATE = 8 * MiB

let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-merge-resume-'))
})

after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

function patterned(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length)
  for (let i = 0; i < length; i++) out[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff
  return out
}

/** sha256 of every file in the volume directory, by relative path. */
async function fingerprint(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>()
  for (const entry of await readdir(dir, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile()) continue
    const path = join(entry.parentPath ?? entry.path, entry.name)
    out.set(path.slice(dir.length + 1), createHash('sha256').update(await readFile(path)).digest('hex'))
  }
  return out
}

/**
 * A volume whose snapshot `s` holds 2 MiB of exceptions (512 chunks), with a merge of `s`
 * started at RATE and stopped after its first step: a merge interrupted as by Ctrl-C.
 * Returns the view `s` presents (what the origin must read as from now on).
 */
async function interruptedMerge(dir: string): Promise<{ merged: Uint8Array; remaining: number }> {
  await Volume.create(dir, { sizeBytes: SIZE })
  const volume = await Volume.open(dir)
  try {
    await volume.origin.write(patterned(SIZE, 1), 0)
    const merged = await volume.origin.read(0, SIZE)
    await volume.createSnapshot('s')
    await volume.origin.write(patterned(2 * MiB, 2), MiB)
    await volume.flush()
    const merge = await volume.startMerge('s', { rateBytesPerSecond: RATE })
    await merge.stop()
    assert.equal(merge.state, 'stopped')
    const remaining = volume.snapshot('s').table.size
    assert.ok(remaining > 0, 'the stopped merge has chunks left')
    return { merged, remaining }
  } finally {
    await volume.close()
  }
}

test('the manifest records the pending merge with its rate', async () => {
  const dir = join(T, 'recorded')
  await interruptedMerge(dir)
  const manifest = await readManifest(dir)
  assert.deepEqual(manifest.merge, { snapshot: 's', rateBytesPerSecond: RATE })
})

test('opening a volume with a pending merge presents the merged view and merges nothing', async () => {
  const dir = join(T, 'readonly')
  const { merged, remaining } = await interruptedMerge(dir)
  const before = await fingerprint(dir)
  // What list, status and read do: open, look, read, close.
  const volume = await Volume.open(dir)
  try {
    assert.equal(volume.merge, null, 'no merge runs')
    assert.deepEqual((await volume.info()).merge, { snapshot: 's', doneChunks: 0, totalChunks: remaining })
    assert.match(volume.statusLine(null), /^0 8192 snapshot-merge \d+\/\d+ \d+$/, 'the origin is still a snapshot-merge target')
    assert.equal(volume.statusLine('s'), '0 8192 snapshot Invalid')
    assertSameBytes(await volume.origin.read(0, SIZE), merged, 'origin presents the merged view')
    await assert.rejects(volume.snapshot('s').read(0, 512), /being merged/)
    assert.equal(volume.snapshot('s').table.size, remaining, 'no chunk was merged')
  } finally {
    await volume.close()
  }
  assert.deepEqual(await fingerprint(dir), before, 'opening and reading changed files of the volume')
})

test('resumeMerge runs at the recorded rate; --rate again updates the recorded rate', async () => {
  const dir = join(T, 'rate')
  const { merged } = await interruptedMerge(dir)
  const volume = await Volume.open(dir)
  try {
    assert.equal(volume.pendingMergeRate, RATE)
    const merge = await volume.resumeMerge()
    assert.ok(merge)
    assert.equal(merge.rateBytesPerSecond, RATE, 'resumed at the recorded rate')
    // A new rate while it runs: applied and recorded (0: no limit, recorded as null).
    const same = await volume.startMerge('s', { rateBytesPerSecond: 2 * RATE })
    assert.equal(same, merge)
    assert.equal(merge.rateBytesPerSecond, 2 * RATE)
    assert.deepEqual((await readManifest(dir)).merge, { snapshot: 's', rateBytesPerSecond: 2 * RATE })
    await volume.startMerge('s', { rateBytesPerSecond: 0 })
    assert.equal(merge.rateBytesPerSecond, 0)
    assert.deepEqual((await readManifest(dir)).merge, { snapshot: 's', rateBytesPerSecond: null })
    await merge.done
    assert.equal(merge.state, 'complete')
    assertSameBytes(await volume.origin.read(0, SIZE), merged, 'origin after the merge')
    assert.equal(volume.pendingMerge, null)
  } finally {
    await volume.close()
  }
})

test('a merge command without --rate resumes at the recorded rate', async () => {
  const dir = join(T, 'keep-rate')
  await interruptedMerge(dir)
  const volume = await Volume.open(dir)
  try {
    const merge = await volume.startMerge('s')
    assert.equal(merge.rateBytesPerSecond, RATE)
    await merge.stop()
  } finally {
    await volume.close()
  }
  assert.deepEqual((await readManifest(dir)).merge, { snapshot: 's', rateBytesPerSecond: RATE })
})

test('offline writes to a volume with a pending merge go through the merged view and survive the merge', async () => {
  const dir = join(T, 'writes')
  const { merged } = await interruptedMerge(dir)
  const expected = merged.slice()
  // One write into chunks the merge has not reached (the COW holds them), one where the
  // snapshot never differed.
  const a = patterned(8192, 3)
  const b = patterned(5000, 4)
  let volume = await Volume.open(dir)
  try {
    await volume.origin.write(a, MiB + 4096)
    await volume.origin.write(b, 3 * MiB + 100)
    expected.set(a, MiB + 4096)
    expected.set(b, 3 * MiB + 100)
    assert.equal(volume.merge, null, 'a write does not resume the merge')
    assertSameBytes(await volume.origin.read(0, SIZE), expected, 'origin after the writes')
  } finally {
    await volume.close()
  }
  volume = await Volume.open(dir)
  try {
    assertSameBytes(await volume.origin.read(0, SIZE), expected, 'origin after reopening')
    const merge = await volume.startMerge('s', { rateBytesPerSecond: 0 })
    await merge.done
    assert.equal(merge.state, 'complete')
    assertSameBytes(await volume.origin.read(0, SIZE), expected, 'origin after the merge')
  } finally {
    await volume.close()
  }
})

test('a manifest from before the rate field still opens; its merge resumes unlimited', async () => {
  const dir = join(T, 'old-manifest')
  await interruptedMerge(dir)
  const path = join(dir, 'volume.json')
  const manifest = JSON.parse(await readFile(path, 'utf8')) as { merge: Record<string, unknown> }
  manifest.merge = { snapshot: 's' }
  await writeFile(path, JSON.stringify(manifest))
  const volume = await Volume.open(dir)
  try {
    assert.equal(volume.pendingMerge, 's')
    assert.equal(volume.pendingMergeRate, null)
    const merge = await volume.resumeMerge()
    assert.equal(merge?.rateBytesPerSecond, 0)
    await merge?.done
    assert.equal(merge?.state, 'complete')
  } finally {
    await volume.close()
  }
})
