/**
 * Block devices wherever an image or COW path is (issue 12, item 4): `create --from /dev/...` and
 * `import --cow /dev/...` take their size from the kernel (a block device's stat size is 0), an
 * alias node of a device backing a snapshot is the same COW, and anything that is neither a
 * regular file nor a block device (character device, FIFO, directory) is refused with one line.
 *
 * Real block devices are loop devices over temp files (`losetup`, root only); where losetup is not
 * available the loop tests are skipped and say so. Every loop device made here is detached in
 * `after`, whatever happened.
 */
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { majorMinor } from '../../src/device/block-device-size.js'
import { FileDevice } from '../../src/device/file-device.js'
import { SnapError } from '../../src/errors.js'
import { Volume } from '../../src/volume/volume.js'
import { assertBytes, assertError, cli, ok, pattern } from './helpers.js'
import { LoopDevices } from '../support/loop-devices.js'

const MiB = 1024 * 1024
let T = ''
const loops = new LoopDevices()
let noLoop: string | null = null

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-blockdev-'))
  noLoop = await loops.probe(T)
})

after(async () => {
  loops.detachAll()
  if (T) await rm(T, { recursive: true, force: true })
})

/** `stat`'s own MAJOR:MINOR of a device node (hex %t:%T), the peer for majorMinor(). */
function statMajorMinor(path: string): string {
  const [major, minor] = execFileSync('stat', ['-c', '%t:%T', path], { encoding: 'utf8' }).trim().split(':')
  return `${parseInt(major!, 16)}:${parseInt(minor!, 16)}`
}

function refusedAsNotBlock(err: unknown): boolean {
  assert.ok(err instanceof SnapError, String(err))
  assert.match(err.message, /is not a regular file or block device$/)
  return true
}

describe('block devices', { concurrency: 1 }, () => {
  it('majorMinor decodes dev_t as glibc does (small and large numbers)', () => {
    // glibc makedev: minor low 8 bits, major 12 bits, minor next 12+ bits, major high bits above 32.
    const makedev = (major: bigint, minor: bigint) =>
      ((major & 0xfffn) << 8n) | ((major & ~0xfffn) << 32n) | (minor & 0xffn) | ((minor & ~0xffn) << 12n)
    for (const [major, minor] of [
      [7n, 0n],
      [8n, 17n],
      [259n, 1048575n],
      [4095n, 255n],
      [4096n, 256n],
      [0xfffffn, 0xfffffn],
    ] as const) {
      assert.equal(majorMinor(makedev(major, minor)), `${major}:${minor}`)
    }
  })

  it('a character device, a FIFO and a directory are refused as image and COW, without blocking', async () => {
    const fifo = join(T, 'fifo')
    execFileSync('mkfifo', [fifo])
    await Volume.create(join(T, 'vol-refuse'), { sizeBytes: MiB })
    const vol = await Volume.open(join(T, 'vol-refuse'))
    try {
      for (const path of ['/dev/null', fifo, T]) {
        await assert.rejects(Volume.create(join(T, 'never'), { fromImage: path }), refusedAsNotBlock, `create --from ${path}`)
        await assert.rejects(vol.importSnapshot('x', path), refusedAsNotBlock, `import --cow ${path}`)
        await assert.rejects(vol.importSnapshot('x', path, { inPlace: true }), refusedAsNotBlock, `import --cow ${path} --in-place`)
      }
      assert.deepEqual(vol.records, [])
    } finally {
      await vol.close()
    }
    await assert.rejects(FileDevice.open('/dev/null', { readOnly: true }), refusedAsNotBlock)
  })

  it('cli: create --from /dev/null fails with one line', async () => {
    assertError(await cli(['create', join(T, 'from-null'), '--from', '/dev/null']), 1, /image \/dev\/null is not a regular file or block device/)
  })

  it('a loop device opens with the kernel size; discard writes zeros and resize is refused', async (t) => {
    if (noLoop) return t.skip(noLoop)
    const file = join(T, 'dev.img')
    const content = pattern(3 * MiB + 512, 1)
    await writeFile(file, content)
    const loop = loops.attach(file)
    assert.equal(majorMinor((await stat(loop, { bigint: true })).rdev), statMajorMinor(loop), 'the kernel numbers of the node')
    const dev = await FileDevice.open(loop, { resizable: true })
    try {
      assert.equal(dev.sizeBytes, content.length, 'size from the kernel, not the stat size 0')
      assert.equal(dev.capabilities.resize, false)
      assertBytes(await dev.read(dev.sizeBytes - 4096, 4096), content.subarray(content.length - 4096), 'the last bytes')
      await dev.discard(MiB, dev.sizeBytes - MiB)
      assertBytes(await dev.read(MiB, dev.sizeBytes - MiB), Buffer.alloc(dev.sizeBytes - MiB), 'discarded to the end')
      await dev.flush()
    } finally {
      await dev.close()
    }
    const after = await readFile(file)
    assert.equal(after.length, content.length, 'the backing file kept its size')
    assertBytes(after.subarray(0, MiB), content.subarray(0, MiB), 'bytes before the discard')
  })

  it('cli: create --from a loop device copies the whole device', async (t) => {
    if (noLoop) return t.skip(noLoop)
    const file = join(T, 'origin-src.img')
    const content = Buffer.concat([pattern(MiB, 2), Buffer.alloc(MiB), pattern(512, 3)])
    await writeFile(file, content)
    const loop = loops.attach(file)
    const vol = join(T, 'from-loop')
    ok(await cli(['create', vol, '--from', loop]), `create --from ${loop}`)
    assertBytes(await readFile(join(vol, 'origin.img')), content, 'origin.img is the device content')
  })

  it('import --cow of a loop device: in place and copied read as the original snapshot; an alias node of it is in use', async (t) => {
    if (noLoop) return t.skip(noLoop)
    // Volume A: a snapshot with a fixed 512K COW, then the origin changed under it.
    const a = join(T, 'vol-a')
    await Volume.create(a, { sizeBytes: MiB })
    const taken = pattern(MiB, 4)
    let cowBytes: Buffer
    let view: Uint8Array
    let originNow: Buffer
    {
      const vol = await Volume.open(a)
      try {
        await vol.origin.write(taken, 0)
        await vol.createSnapshot('s', { chunkSizeBytes: 4096, cowSizeBytes: 512 * 1024 })
        await vol.origin.write(pattern(200_000, 5), 10_000)
        await vol.flush()
        view = await vol.snapshot('s').read(0, MiB)
        originNow = Buffer.from(await vol.origin.read(0, MiB))
      } finally {
        await vol.close()
      }
      cowBytes = await readFile(join(a, 'snapshots', 's.cow'))
    }
    assertBytes(view, taken, 'A@s is the origin when it was taken')
    const cowFile = join(T, 'cow-on-loop.img')
    await writeFile(cowFile, cowBytes)
    const loop = loops.attach(cowFile)

    const originFile = join(T, 'origin-b.img')
    await writeFile(originFile, originNow)
    const b = join(T, 'vol-b')
    await Volume.create(b, { fromImage: originFile })
    const vol = await Volume.open(b)
    try {
      await vol.importSnapshot('k', loop, { inPlace: true })
      assertBytes(await vol.snapshot('k').read(0, MiB), taken, 'imported in place from the device')
      const info = (await vol.info()).snapshots.find((s) => s.name === 'k')!
      assert.equal(info.cowPath, loop)
      assert.equal(info.cowSizeBytes, 512 * 1024, 'COW size from the kernel')

      // Another node for the same device is the same COW.
      const alias = join(T, 'alias')
      const [major, minor] = statMajorMinor(loop).split(':')
      execFileSync('mknod', [alias, 'b', major!, minor!])
      await assert.rejects(vol.importSnapshot('k2', alias, { inPlace: true }), /already used by snapshot 'k'/)
      await assert.rejects(vol.importSnapshot('k2', alias), /already used by snapshot 'k'/)

      await vol.removeSnapshot('k')
      await vol.importSnapshot('c', loop)
      assertBytes(await readFile(join(b, 'snapshots', 'c.cow')), cowBytes, 'the copy holds the whole device')
      assertBytes(await vol.snapshot('c').read(0, MiB), taken, 'imported as a copy of the device')
    } finally {
      await vol.close()
    }
  })
})
