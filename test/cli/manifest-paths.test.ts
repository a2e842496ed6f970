/**
 * The reproduction through the CLI: a transient record whose cowFile names a file
 * outside the volume makes `list` fail with one line naming the field and value, and the file
 * survives (it used to be deleted by any command that opened the volume).
 */
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test } from 'node:test'
import { Volume } from '../../src/volume/volume.js'
import { assertError, cli } from './helpers.js'

test('list refuses a manifest whose transient cowFile points outside the volume, and deletes nothing', async () => {
  const root = await mkdtemp(join(tmpdir(), 'bs-cli-manifest-'))
  try {
    const vol = join(root, 'vol')
    await Volume.create(vol, { sizeBytes: 1024 * 1024 })
    const victim = join(root, 'victim')
    await writeFile(victim, 'keep me')
    const manifestPath = join(vol, 'volume.json')
    const manifest = JSON.parse(await readFile(manifestPath, 'utf8'))
    manifest.snapshots.push({ name: 't', chunkSizeBytes: 4096, store: 'transient', overflow: false, cowFile: victim, cowSizeBytes: null, createdAt: '2024-01-01T00:00:00.000Z' })
    await writeFile(manifestPath, JSON.stringify(manifest))
    const stderr = assertError(await cli(['list', vol]), 1)
    assert.ok(stderr.includes(`cowFile ${JSON.stringify(victim)}`), stderr)
    assert.equal(await readFile(victim, 'utf8'), 'keep me')
  } finally {
    await rm(root, { recursive: true, force: true })
  }
})
