/**
 * `read --output FILE` (issue 12, item 5): the bytes go through a temporary file in FILE's
 * directory, renamed over FILE only when the whole read succeeded. A failed read (missing or
 * merging snapshot, server gone) leaves an existing FILE byte for byte as it was and leaves no
 * temporary file behind.
 */
import assert from 'node:assert/strict'
import { chmod, mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { writeOutputFile } from '../../src/cli/output-file.js'
import { SnapError } from '../../src/errors.js'
import { Volume } from '../../src/volume/volume.js'
import { assertBytes, assertError, cli, ok, pattern } from './helpers.js'

let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-read-output-'))
})

after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

describe('read --output', { concurrency: 1 }, () => {
  it('cli: a read of a missing snapshot fails with one line and leaves an existing FILE untouched', async () => {
    const vol = join(T, 'vol')
    await Volume.create(vol, { sizeBytes: 64 * 1024 })
    const outDir = join(T, 'out-missing')
    await mkdir(outDir)
    const out = join(outDir, 'keep.bin')
    const kept = pattern(10_000, 1)
    await writeFile(out, kept)
    assertError(await cli(['read', `${vol}@missing`, '--output', out]), 1, /no snapshot 'missing'/)
    assertBytes(await readFile(out), kept, 'FILE after the failed read')
    assert.deepEqual(await readdir(outDir), ['keep.bin'], 'no temporary file left')
  })

  it('cli: a successful read replaces FILE whole, keeps its mode and leaves no temporary file', async () => {
    const vol = join(T, 'vol-ok')
    await Volume.create(vol, { sizeBytes: 256 * 1024 })
    const content = pattern(256 * 1024, 2)
    const v = await Volume.open(vol)
    try {
      await v.origin.write(content, 0)
      await v.flush()
    } finally {
      await v.close()
    }
    const outDir = join(T, 'out-ok')
    await mkdir(outDir)
    const out = join(outDir, 'data.bin')
    await writeFile(out, pattern(1024 * 1024, 3)) // longer than the read: must not leave a tail
    await chmod(out, 0o640)
    ok(await cli(['read', vol, '--offset', '1000', '--length', '100000', '--output', out]), 'read --output')
    assertBytes(await readFile(out), content.subarray(1000, 101_000), 'FILE after the read')
    assert.equal((await stat(out)).mode & 0o777, 0o640, 'mode kept')
    assert.deepEqual(await readdir(outDir), ['data.bin'])
  })

  it('writeOutputFile: a producer failing part way (server gone) leaves FILE as it was; a new FILE is not created', async () => {
    const out = join(T, 'partial.bin')
    const kept = pattern(5000, 4)
    await writeFile(out, kept)
    const gone = new SnapError('SNAP_IO', 'control connection closed')
    const failing = async (write: (data: Uint8Array) => Promise<void>) => {
      await write(pattern(4 * 1024 * 1024, 5))
      throw gone
    }
    await assert.rejects(writeOutputFile(out, failing), (err) => err === gone)
    assertBytes(await readFile(out), kept, 'existing FILE')
    const fresh = join(T, 'fresh.bin')
    await assert.rejects(writeOutputFile(fresh, failing), (err) => err === gone)
    await assert.rejects(stat(fresh), { code: 'ENOENT' })
    assert.deepEqual((await readdir(T)).filter((n) => n.includes('.tmp')), [], 'no temporary file left')
  })

  it('writeOutputFile: a missing directory is one SNAP_NOT_FOUND line naming it', async () => {
    await assert.rejects(writeOutputFile(join(T, 'nope', 'x.bin'), async () => {}), (err) => {
      assert.ok(err instanceof SnapError && err.code === 'SNAP_NOT_FOUND', String(err))
      assert.equal(err.message, `directory ${join(T, 'nope')} does not exist`)
      return true
    })
  })
})
