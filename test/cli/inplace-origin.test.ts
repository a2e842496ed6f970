/**
 * In-place origins on the command line and on block devices (issue 16 item 4): `create VOL
 * --origin /dev/loopN` takes the size from the kernel and copies nothing, writes land in the
 * loop device's backing file, a second volume on the device (or on its backing file) is refused
 * with one line naming the first, a mounted device is refused, and while a volume has the device
 * open the kernel refuses other exclusive claims (an alias node, a mount).
 *
 * Loop devices need root (`losetup`); where it is not available those tests are skipped and say
 * so. Every loop device made here is detached, and every mount undone, in `after`.
 */
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { readManifest } from '../../src/volume/manifest.js'
import { Volume } from '../../src/volume/volume.js'
import { assertBytes, assertError, cli, ok, pattern } from './helpers.js'
import { refusedWith } from '../support/refused-with.js'
import { LoopDevices } from '../support/loop-devices.js'

const MiB = 1024 * 1024
let T = ''
const loops = new LoopDevices()
const mounts: string[] = []
let noLoop: string | null = null
let savedStateDir: string | undefined

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-inplace-cli-'))
  savedStateDir = process.env.BLOCKSNAP_STATE_DIR
  process.env.BLOCKSNAP_STATE_DIR = join(T, 'state') // inherited by the CLI processes
  noLoop = await loops.probe(T)
})

after(async () => {
  for (const dir of mounts) {
    try {
      execFileSync('umount', [dir], { stdio: 'ignore' })
    } catch {
      // not mounted
    }
  }
  loops.detachAll()
  if (savedStateDir === undefined) delete process.env.BLOCKSNAP_STATE_DIR
  else process.env.BLOCKSNAP_STATE_DIR = savedStateDir
  if (T) await rm(T, { recursive: true, force: true })
})


describe('in-place origins: CLI and block devices', { concurrency: 1 }, () => {
  it('cli: create takes exactly one of --size, --from, --origin; --origin on a file copies nothing', async () => {
    const img = join(T, 'cli.img')
    await writeFile(img, pattern(MiB, 1))
    assertError(await cli(['create', join(T, 'both'), '--size', '1M', '--origin', img]), 2, /exactly one of --size, --from or --origin/)
    const vol = join(T, 'cli-vol')
    ok(await cli(['create', vol, '--origin', img]), 'create --origin')
    assert.deepEqual((await readdir(vol)).sort(), ['snapshots', 'volume.json'])
    const again = assertError(await cli(['create', join(T, 'cli-vol2'), '--origin', img]), 4)
    assert.equal(again, `blocksnap: error [SNAP_BUSY]: origin ${img} is already used by volume ${vol}\n`)
  })

  it('create --origin /dev/loopN: kernel size, no copy, writes land in the backing file', async (t) => {
    if (noLoop) return t.skip(noLoop)
    const file = join(T, 'loop-origin.img')
    const content = pattern(3 * MiB + 512, 2)
    await writeFile(file, content)
    const loop = loops.attach(file)
    const dir = join(T, 'loop-vol')
    ok(await cli(['create', dir, '--origin', loop]), `create --origin ${loop}`)
    const manifest = await readManifest(dir)
    assert.equal(manifest.sizeBytes, content.length, 'size from the kernel, not the stat size 0')
    assert.equal(manifest.originFile, loop)

    const model = Buffer.from(content)
    const vol = await Volume.open(dir)
    try {
      await vol.createSnapshot('s', { chunkSizeBytes: 8192 })
      const patch = pattern(70_000, 3)
      await vol.origin.write(patch, MiB - 1000)
      patch.copy(model, MiB - 1000)
      await vol.flush()
      assertBytes(await vol.snapshot('s').read(0, content.length), content, 'the snapshot reads the device as it was')

      // While the volume has it open the kernel refuses other claims: an alias node, a second volume.
      const [major, minor] = execFileSync('stat', ['-c', '%t %T', loop], { encoding: 'utf8' }).trim().split(' ').map((h) => String(parseInt(h, 16)))
      const alias = join(T, 'loop-alias')
      execFileSync('mknod', [alias, 'b', major!, minor!])
      process.env.BLOCKSNAP_STATE_DIR = join(T, 'other-state') // past the registry: the kernel's claim alone
      try {
        await assert.rejects(Volume.create(join(T, 'alias-vol'), { inPlaceOrigin: alias }), refusedWith('SNAP_BUSY', new RegExp(`block device ${alias} is in use`)))
      } finally {
        process.env.BLOCKSNAP_STATE_DIR = join(T, 'state')
      }
    } finally {
      await vol.close()
    }
    // Read back through the file the loop device reads, not through blocksnap.
    execFileSync('blockdev', ['--flushbufs', loop])
    assertBytes(await readFile(file), model, 'the backing file holds the write')
    assert.ok((await stat(file)).isFile())

    // The same storage by another name: a second create through the device or its backing file.
    await assert.rejects(Volume.create(join(T, 'loop-vol2'), { inPlaceOrigin: loop }), refusedWith('SNAP_BUSY', new RegExp(`origin ${loop} is already used by volume ${dir}$`)))
    await assert.rejects(Volume.create(join(T, 'loop-vol2'), { inPlaceOrigin: file }), refusedWith('SNAP_BUSY', new RegExp(`already used by volume ${dir} \\(as ${loop}, the same storage\\)$`)))
  })

  it('a mounted block device is refused as an origin', async (t) => {
    if (noLoop) return t.skip(noLoop)
    const file = join(T, 'fs.img')
    await writeFile(file, Buffer.alloc(8 * MiB))
    const loop = loops.attach(file)
    const where = join(T, 'mnt')
    await mkdir(where)
    try {
      execFileSync('mkfs.ext4', ['-q', loop], { stdio: 'ignore' })
      execFileSync('mount', [loop, where], { stdio: 'ignore' })
      mounts.push(where)
    } catch (err) {
      return t.skip(`cannot mount an ext4 loop device here (${(err as Error).message.split('\n')[0]})`)
    }
    await assert.rejects(Volume.create(join(T, 'mounted-vol'), { inPlaceOrigin: loop }), refusedWith('SNAP_BUSY', new RegExp(`block device ${loop} is in use \\(mounted`)))
    await assert.rejects(stat(join(T, 'mounted-vol')))

    // Unmounted, it becomes an origin; while the volume has it open the kernel refuses a mount.
    execFileSync('umount', [where])
    await Volume.create(join(T, 'mounted-vol'), { inPlaceOrigin: loop })
    const vol = await Volume.open(join(T, 'mounted-vol'))
    try {
      assert.throws(() => execFileSync('mount', [loop, where], { stdio: 'pipe' }), /busy/i, 'mount while the volume is open')
    } finally {
      await vol.close()
    }
    execFileSync('mount', [loop, where], { stdio: 'ignore' })
    execFileSync('umount', [where])
  })
})
