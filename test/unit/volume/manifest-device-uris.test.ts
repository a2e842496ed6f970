/**
 * Device addresses in the manifest and the Volume API (issue 18 item 2), in process against
 * nbdkit `memory` exports: a manifest accepts a device URI for an external origin or COW only
 * when it parses (paths stay confined as before, old manifests still read); `cowDevice` with a
 * size below the device's gives the store exactly that size; a new file path becomes a COW that
 * grows on demand and is kept on remove; one export cannot be the origin of two volumes.
 */
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { isSnapError } from '../../../src/errors.js'
import { MANIFEST_FILE, readManifest } from '../../../src/volume/manifest.js'
import { Volume } from '../../../src/volume/volume.js'
import { PeerServer } from '../../support/nbd-peer.js'
import { type Json, editManifest } from '../../support/edit-manifest.js'

const KiB = 1024
const MiB = 1024 * KiB
let T = ''
const peers: PeerServer[] = []
let savedStateDir: string | undefined

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'bs-manifest-uris-'))
  savedStateDir = process.env.BLOCKSNAP_STATE_DIR
  process.env.BLOCKSNAP_STATE_DIR = join(T, 'state')
})

after(async () => {
  for (const peer of peers) await peer.stop()
  if (savedStateDir === undefined) delete process.env.BLOCKSNAP_STATE_DIR
  else process.env.BLOCKSNAP_STATE_DIR = savedStateDir
  await rm(T, { recursive: true, force: true })
})

async function memory(name: string, sizeBytes: number): Promise<PeerServer> {
  const peer = await PeerServer.nbdkit(join(T, `${name}.sock`), ['memory', String(sizeBytes)]).start()
  peers.push(peer)
  return peer
}


async function refusedCode(promise: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(isSnapError(err, code as never), `expected ${code}, got ${String(err)}`)
    assert.match((err as Error).message, pattern)
    assert.doesNotMatch((err as Error).message, /\n/)
    return true
  })
}

test('a manifest takes a device URI for an external origin or COW only when it parses; paths stay confined', async () => {
  const origin = await memory('m-origin', 1 * MiB)
  const cow = await memory('m-cow', 256 * KiB)
  const vol = join(T, 'manifest')
  await Volume.create(vol, { inPlaceOrigin: origin.uri() })
  const v = await Volume.open(vol)
  await v.createSnapshot('s', { cowDevice: cow.uri() })
  await v.close()
  const m = await readManifest(vol)
  assert.equal(m.originFile, origin.uri())
  assert.equal(m.originExternal, true)
  assert.deepEqual([m.snapshots[0]!.cowFile, m.snapshots[0]!.external, m.snapshots[0]!.cowSizeBytes], [cow.uri(), true, 256 * KiB])

  const bad: Array<[string, (m: Json & { snapshots: Json[] }) => void, RegExp]> = [
    ['origin URI without a socket', (j) => (j.originFile = 'nbd+unix:///x'), /external originFile .* neither a clean absolute path nor a valid device URI/],
    ['origin URI with a password', (j) => (j.originFile = 'nbds://u:pw@host/x'), /external originFile/],
    ['origin URI not marked external', (j) => delete j.originExternal, /originFile .* is not a file name inside the volume directory/],
    ['COW URI with an unknown parameter', (j) => (j.snapshots[0]!.cowFile = `${cow.uri()}&x=1`), /external cowFile .* neither a clean absolute path nor a valid device URI/],
    ['COW URI not marked external', (j) => delete j.snapshots[0]!.external, /cowFile .* is not a file in the volume's snapshots\/ directory/],
    ['relative external COW path', (j) => (j.snapshots[0]!.cowFile = 'x/../y.cow'), /external cowFile/],
  ]
  const original = await readFile(join(vol, MANIFEST_FILE), 'utf8')
  for (const [what, edit, pattern] of bad) {
    await editManifest(vol, edit)
    await refusedCode(readManifest(vol), 'SNAP_CORRUPT_METADATA', pattern)
    await writeFile(join(vol, MANIFEST_FILE), original)
    assert.ok(what)
  }
  // The data path still works after all that: the volume opens over its exports.
  const again = await Volume.open(vol)
  assert.equal(again.sizeBytes, 1 * MiB)
  assert.equal(again.snapshot('s').state, 'active')
  await again.close()
})

test('--cow-size below the device size: the COW is that size (and stays so when reopened); above it is refused', async () => {
  const cow = await memory('w-cow', 1 * MiB)
  const vol = join(T, 'window')
  await Volume.create(vol, { sizeBytes: 1 * MiB })
  const v = await Volume.open(vol)
  await refusedCode(v.createSnapshot('big', { cowDevice: cow.uri(), cowSizeBytes: 2 * MiB }), 'SNAP_BAD_ARGUMENT', /COW size 2097152 is larger than COW device/)
  await v.createSnapshot('s', { cowDevice: cow.uri(), cowSizeBytes: 64 * KiB })
  assert.equal(v.snapshot('s').usage().totalSectors * 512, 64 * KiB)
  // 14 data chunks fit in 64 KiB; on the whole 1 MiB device 254 would.
  await v.origin.write(Buffer.alloc(20 * 4 * KiB, 1), 0)
  assert.equal(v.snapshot('s').state, 'invalid', 'overflowed at the size given, not the device size')
  await v.close()
  const reopened = await Volume.open(vol)
  const info = await reopened.info()
  assert.deepEqual([info.snapshots[0]!.cowSizeBytes, info.snapshots[0]!.state], [64 * KiB, 'invalid'])
  await reopened.close()
})

test('a new file path as --cow grows on demand and is kept on remove; an existing one is fixed at its size', async () => {
  const vol = join(T, 'files')
  await Volume.create(vol, { sizeBytes: 1 * MiB })
  const v = await Volume.open(vol)
  const grown = join(T, 'grown.cow')
  await v.createSnapshot('g', { cowDevice: grown })
  await v.origin.write(Buffer.alloc(64 * KiB, 2), 0)
  // A write may be answered once its copy-outs start (write-back): the flush waits for them to land.
  await v.origin.flush()
  assert.equal(v.record('g').cowSizeBytes, null)
  assert.equal(v.record('g').external, true)
  assert.ok((await stat(grown)).size >= 64 * KiB, 'the file grew to hold the copies')
  const fixed = join(T, 'fixed.cow')
  await writeFile(fixed, Buffer.alloc(128 * KiB, 0xee))
  await v.createSnapshot('f', { cowDevice: fixed })
  assert.equal(v.record('f').cowSizeBytes, 128 * KiB)
  await refusedCode(v.createSnapshot('f2', { cowDevice: fixed }), 'SNAP_BUSY', /already used by snapshot 'f'/)
  await v.removeSnapshot('g')
  await v.removeSnapshot('f')
  await v.close()
  assert.ok((await stat(grown)).isFile(), 'never deleted')
  assert.equal((await readFile(fixed)).readUInt32LE(0), 0x70416e53, 'still the COW it became')
})

test('one export is the origin of one volume; a COW export is not an origin', async () => {
  const origin = await memory('o-origin', 1 * MiB)
  const cow = await memory('o-cow', 256 * KiB)
  const first = join(T, 'first')
  await Volume.create(first, { inPlaceOrigin: origin.uri() })
  // The same export spelled differently is the same origin.
  const alias = `nbd+unix:///?socket=${join(T, '.', 'o-origin.sock')}`
  await refusedCode(Volume.create(join(T, 'second'), { inPlaceOrigin: alias }), 'SNAP_BUSY', /already used by volume .*first/)
  const v = await Volume.open(first)
  await refusedCode(Volume.create(join(T, 'third'), { inPlaceOrigin: origin.uri() }), 'SNAP_BUSY', /in use by volume .*first|already used by volume/)
  await v.createSnapshot('s', { cowDevice: cow.uri() })
  await refusedCode(v.createSnapshot('t', { cowDevice: origin.uri() }), 'SNAP_BAD_ARGUMENT', /is the origin of volume first/)
  await v.close()
  await refusedCode(Volume.create(join(T, 'fourth'), { inPlaceOrigin: cow.uri() }), 'SNAP_BAD_ARGUMENT', /holds a snapshot COW/)
  await assert.rejects(stat(join(T, 'second')))
})
