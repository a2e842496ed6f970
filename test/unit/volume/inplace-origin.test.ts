/**
 * In-place origins (issue 16 item 4), through the Volume API: `create --origin` uses an image
 * file where it is (same inode: writes land in it, snapshots keep the old data in kernel-format
 * COWs), records it as an external origin, and never deletes it (not on remove, not after a
 * merge). Refused: an origin another volume uses (at create, by the registry, naming the volume;
 * at open, by the origin's flock, while the other volume has it open), a missing path, a
 * character device, a volume's own files, a COW, a size that no longer matches at open.
 *
 * The model is a plain Buffer of what the origin and each snapshot must read; the image file is
 * read with fs, not through blocksnap. BLOCKSNAP_STATE_DIR points the origin registry at a temp
 * directory, so the test never touches the user's state.
 */
import assert from 'node:assert/strict'
import { cp, mkdtemp, readFile, readdir, rm, stat, truncate, writeFile, link } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { MANIFEST_FILE, readManifest } from '../../../src/volume/manifest.js'
import { Volume } from '../../../src/volume/volume.js'
import { decodeHeader } from '../../../src/format/header.js'
import { assertBytes, pattern } from '../../cli/helpers.js'
import { refusedWith } from '../../support/refused-with.js'

const MiB = 1024 * 1024
let T = ''
let savedStateDir: string | undefined

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-inplace-'))
  savedStateDir = process.env.BLOCKSNAP_STATE_DIR
  process.env.BLOCKSNAP_STATE_DIR = join(T, 'state')
})

after(async () => {
  if (savedStateDir === undefined) delete process.env.BLOCKSNAP_STATE_DIR
  else process.env.BLOCKSNAP_STATE_DIR = savedStateDir
  if (T) await rm(T, { recursive: true, force: true })
})


async function image(name: string, content: Buffer): Promise<string> {
  const path = join(T, name)
  await writeFile(path, content)
  return path
}

describe('in-place origins', { concurrency: 1 }, () => {
  it('create --origin uses the file where it is: writes land in it, snapshots read the old data', async () => {
    const content = pattern(2 * MiB, 1)
    const img = await image('disk.img', content)
    const inode = (await stat(img)).ino
    const dir = join(T, 'vol')
    await Volume.create(dir, { inPlaceOrigin: img })

    const manifest = await readManifest(dir)
    assert.equal(manifest.originFile, img)
    assert.equal(manifest.originExternal, true)
    assert.equal(manifest.sizeBytes, content.length, 'size from the file')
    assert.deepEqual((await readdir(dir)).sort(), ['snapshots', MANIFEST_FILE].sort(), 'nothing copied into the volume')

    const model = Buffer.from(content)
    const vol = await Volume.open(dir)
    try {
      assert.equal((await vol.info()).originPath, img)
      await vol.createSnapshot('s', { chunkSizeBytes: 4096 })
      const patch = pattern(300_000, 2)
      await vol.origin.write(patch, 50_000)
      patch.copy(model, 50_000)
      await vol.flush()
      assertBytes(await readFile(img), model, 'the image file holds the write')
      assertBytes(await vol.snapshot('s').read(0, content.length), content, 'the snapshot reads the origin as it was')
    } finally {
      await vol.close()
    }
    assert.equal((await stat(img)).ino, inode, 'the same file, not a copy')
    const cow = await readFile(join(dir, 'snapshots', 's.cow'))
    assert.equal(decodeHeader(cow.subarray(0, 512)).kind, 'existing', 'the COW is the kernel format')
  })

  it('a second volume on the same origin is refused, naming the first; a hard link is the same origin', async () => {
    const img = await image('shared.img', pattern(MiB, 3))
    const first = join(T, 'first')
    await Volume.create(first, { inPlaceOrigin: img })
    await assert.rejects(Volume.create(join(T, 'second'), { inPlaceOrigin: img }), refusedWith('SNAP_BUSY', new RegExp(`origin ${img} is already used by volume ${first}$`)))
    const alias = join(T, 'shared-link.img')
    await link(img, alias)
    await assert.rejects(Volume.create(join(T, 'second'), { inPlaceOrigin: alias }), refusedWith('SNAP_BUSY', new RegExp(`already used by volume ${first}$`)))
    await assert.rejects(stat(join(T, 'second')), 'a refused create leaves no directory')

    // A volume deleted with rm -rf leaves a stale claim, which does not stand in the way.
    await rm(first, { recursive: true })
    await Volume.create(join(T, 'second'), { inPlaceOrigin: img })
    const v = await Volume.open(join(T, 'second'))
    await v.close()
  })

  it('two volumes sharing an origin cannot be open at once', async () => {
    const img = await image('twice.img', pattern(MiB, 4))
    const a = join(T, 'twice-a')
    await Volume.create(a, { inPlaceOrigin: img })
    // A second volume over the same origin, as a user with another state directory would make it.
    const useState = (name: string) => (process.env.BLOCKSNAP_STATE_DIR = join(T, name))
    const b = join(T, 'twice-b')
    try {
      useState('other-state')
      await Volume.create(b, { inPlaceOrigin: img })
      useState('state')
      const va = await Volume.open(a)
      try {
        useState('other-state')
        await assert.rejects(Volume.open(b), refusedWith('SNAP_BUSY', new RegExp(`origin ${img} is in use by another open volume$`)))
      } finally {
        await va.close()
      }
      // Once a is closed, b opens (its registry knows nothing of a); then a is the one refused.
      const vb = await Volume.open(b)
      try {
        useState('state')
        await assert.rejects(Volume.open(a), refusedWith('SNAP_BUSY', new RegExp(`origin ${img} is in use by another open volume$`)))
      } finally {
        await vb.close()
      }
    } finally {
      useState('state')
    }
    // In the same state directory the registry names the volume holding it; a copy of the
    // volume directory is refused even when the other is closed.
    const va = await Volume.open(a)
    try {
      await assert.rejects(Volume.open(b), refusedWith('SNAP_BUSY', new RegExp(`origin ${img} is in use by volume ${a}$`)))
    } finally {
      await va.close()
    }
    await assert.rejects(Volume.open(b), refusedWith('SNAP_BUSY', new RegExp(`origin ${img} is already used by volume ${a}$`)))
    const copy = join(T, 'twice-copy')
    await cp(a, copy, { recursive: true })
    await assert.rejects(Volume.open(copy), refusedWith('SNAP_BUSY', new RegExp(`already used by volume ${a}$`)))
    const again = await Volume.open(a)
    await again.close()
  })

  it('refuses a missing path, a character device, a volume file, a COW and an odd size', async () => {
    const never = join(T, 'never')
    await assert.rejects(Volume.create(never, { inPlaceOrigin: join(T, 'missing.img') }), refusedWith('SNAP_NOT_FOUND', /origin .*missing\.img does not exist$/))
    await assert.rejects(Volume.create(never, { inPlaceOrigin: '/dev/null' }), refusedWith('SNAP_BAD_ARGUMENT', /origin \/dev\/null is not a regular file or block device$/))
    await assert.rejects(Volume.create(never, { inPlaceOrigin: await image('odd.img', Buffer.alloc(1000)) }), refusedWith('SNAP_BAD_ARGUMENT', /is 1000 bytes/))

    const own = join(T, 'own')
    await Volume.create(own, { sizeBytes: MiB })
    const v = await Volume.open(own)
    await v.createSnapshot('s')
    await v.close()
    for (const part of [join(own, 'origin.img'), join(own, 'snapshots', 's.cow')]) {
      await assert.rejects(Volume.create(never, { inPlaceOrigin: part }), refusedWith('SNAP_BAD_ARGUMENT', new RegExp(`is inside volume ${own}`)), part)
    }
    const cowCopy = await image('cow-copy.img', await readFile(join(own, 'snapshots', 's.cow')))
    await assert.rejects(Volume.create(never, { inPlaceOrigin: cowCopy }), refusedWith('SNAP_BAD_ARGUMENT', /holds a snapshot COW/))
    await assert.rejects(stat(never))
  })

  it('an origin whose size changed is refused at open, with one line, and left as it is', async () => {
    const img = await image('resized.img', pattern(MiB, 5))
    const dir = join(T, 'resized')
    await Volume.create(dir, { inPlaceOrigin: img })
    await truncate(img, 2 * MiB)
    await assert.rejects(Volume.open(dir), refusedWith('SNAP_CORRUPT_METADATA', new RegExp(`origin ${img} is ${2 * MiB} bytes, manifest says ${MiB}$`)))
    assert.equal((await stat(img)).size, 2 * MiB)
    await truncate(img, MiB)
    const v = await Volume.open(dir)
    await v.close()
    await rm(img)
    await assert.rejects(Volume.open(dir), refusedWith('SNAP_NOT_FOUND', new RegExp(`origin ${img} of volume resized does not exist$`)))
  })

  it('removing snapshots and merging never delete the origin; a merge lands in the image file', async () => {
    const content = pattern(MiB, 6)
    const img = await image('merged.img', content)
    const dir = join(T, 'merged')
    await Volume.create(dir, { inPlaceOrigin: img })
    const vol = await Volume.open(dir)
    try {
      await vol.createSnapshot('keep')
      await vol.createSnapshot('drop')
      await vol.origin.write(pattern(100_000, 7), 4096)
      await vol.removeSnapshot('drop')
      const merge = await vol.startMerge('keep')
      await merge.done
      assert.deepEqual(vol.records, [])
      await vol.flush()
    } finally {
      await vol.close()
    }
    assertBytes(await readFile(img), content, 'the image file holds the merged snapshot')
    assert.deepEqual(await readdir(join(dir, 'snapshots')), [], 'the merged and removed COWs are gone')
  })
})
