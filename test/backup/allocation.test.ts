/**
 * Issue 17 item 3: real allocation. Where a file holds data comes from FIEMAP (filefrag) and is
 * cached; no write through the device may ever be reported as a hole afterwards (a stale hole
 * makes a backup tool skip data), and the answer matches qemu-img map (SEEK_DATA) of the file.
 * In process, against byte models; qemu-img is the peer for the real file system.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, test } from 'node:test'
import { FileAllocation, type FileScanner } from '../../src/device/file-allocation.js'
import { FileDevice } from '../../src/device/file-device.js'
import { RangeList } from '../../src/device/range-list.js'
import { allocationExtents } from '../../src/volume/block-maps.js'
import { Volume } from '../../src/volume/volume.js'
import { Random } from '../support/random.js'
import { requireTools, runOk } from '../support/nbd-tools.js'

const KiB = 1024
const MiB = 1024 * KiB
const BLOCK = 4096 // the file system block size the model rounds to (ext4 here and in CI)

const T = await mkdtemp(join(tmpdir(), 'blocksnap-allocation-'))
after(() => rm(T, { recursive: true, force: true }))

/** Byte-granular model of a set of ranges, as a bitmap over `size` bytes in `unit` units. */
class UnitModel {
  readonly bits: Uint8Array
  readonly sizeBytes: number
  readonly unit: number
  constructor(sizeBytes: number, unit: number) {
    this.sizeBytes = sizeBytes
    this.unit = unit
    this.bits = new Uint8Array(Math.ceil(sizeBytes / unit))
  }
  mark(offset: number, length: number): void {
    for (let u = Math.floor(offset / this.unit); u * this.unit < offset + length; u++) this.bits[u] = 1
  }
  /** The marked units as sorted, merged byte ranges (clipped to the size). */
  ranges(): Array<[number, number]> {
    const out: Array<[number, number]> = []
    for (let u = 0; u < this.bits.length; u++) {
      if (!this.bits[u]) continue
      const s = u * this.unit
      const e = Math.min(this.sizeBytes, (u + 1) * this.unit)
      const last = out[out.length - 1]
      if (last && last[1] === s) last[1] = e
      else out.push([s, e])
    }
    return out
  }
}

test('RangeList: add/within/covers agree with a bitmap model (seeded)', () => {
  for (const seed of [1, 2, 3, 4, 5]) {
    const rnd = new Random(seed)
    const size = 4096
    const model = new UnitModel(size, 1)
    const list = new RangeList()
    for (let i = 0; i < 200; i++) {
      const s = rnd.int(size)
      const len = 1 + rnd.int(64)
      const e = Math.min(size, s + len)
      list.add(s, e)
      model.mark(s, e - s)
      const qs = rnd.int(size)
      const qe = Math.min(size, qs + 1 + rnd.int(300))
      const want = model.ranges().map(([a, b]): [number, number] => [Math.max(a, qs), Math.min(b, qe)]).filter(([a, b]) => b > a)
      assert.deepEqual(list.within(qs, qe), want, `seed ${seed} step ${i}`)
      assert.equal(list.covers(qs, qe), want.length === 1 && want[0]![0] === qs && want[0]![1] === qe, `covers, seed ${seed} step ${i}`)
    }
    assert.deepEqual(list.within(0, size), model.ranges())
  }
})

test('FileAllocation: a cached map never reports a hole where a write went, in flight or done, before or during the scan', async () => {
  let scans = 0
  let release: (() => void) | null = null
  // The "file system" knows only [0, 4096) as data, whatever is written: the cache is all that
  // can make later writes show.
  const scanner: FileScanner = async () => {
    scans++
    if (scans === 1) await new Promise<void>((r) => (release = r))
    const data = new RangeList()
    data.add(0, 4096)
    return { kind: 'mapped', data }
  }
  const alloc = new FileAllocation('/nonexistent', scanner)
  const size = 1 * MiB
  // Written bytes count as whole 4 KiB blocks, as a file system allocates them.
  const block = (at: number): [number, number] => [Math.floor(at / 4096) * 4096, Math.floor(at / 4096) * 4096 + 4096]
  const beforeScan = alloc.writeStarted(100_000, 10) // under way as the scan starts
  const query = alloc.dataRanges(0, size, size)
  const duringScan = alloc.writeStarted(200_000, 10)
  duringScan() // done while the scan runs (the scan result does not have it)
  release!()
  assert.deepEqual(await query, [[0, 4096], block(100_000), block(200_000)])
  beforeScan() // finishes after the scan: must stay data
  const after = alloc.writeStarted(300_000, 5)
  assert.deepEqual(await alloc.dataRanges(0, size, size), [[0, 4096], block(100_000), block(200_000), block(300_000)], 'in flight')
  after()
  assert.deepEqual(await alloc.dataRanges(299_500, 400_000, size), [[299_500, block(300_000)[1]]], 'done, clipped to the window')
  assert.equal(scans, 1, 'answered from the cache')
  alloc.forget()
  assert.deepEqual(await alloc.dataRanges(0, size, size), [[0, 4096]], 'a fresh scan forgets the overlay (the real file would show the writes)')
  assert.equal(scans, 2)
})

test('FileAllocation: a file system that cannot tell means all data, never holes', async () => {
  const alloc = new FileAllocation('/x', async () => ({ kind: 'unsupported', reason: 'no FIEMAP' }))
  assert.deepEqual(await alloc.dataRanges(10, 5000, 8192), [[10, 5000]])
  assert.equal(alloc.unsupportedReason, 'no FIEMAP')
  const retry = new FileAllocation('/x', async () => ({ kind: 'retry', reason: 'changed' }))
  assert.deepEqual(await retry.dataRanges(0, 8192, 8192), [[0, 8192]])
})

/** qemu-img map of a raw file: its data ranges. */
async function qemuData(path: string): Promise<Array<[number, number]>> {
  const { stdout } = await runOk('qemu-img', ['map', '-U', '--output=json', '-f', 'raw', path])
  const out: Array<[number, number]> = []
  for (const e of JSON.parse(stdout) as Array<{ start: number; length: number; data: boolean }>) {
    if (!e.data) continue
    const last = out[out.length - 1]
    if (last && last[1] === e.start) last[1] = e.start + e.length
    else out.push([e.start, e.start + e.length])
  }
  return out
}

test('FileDevice.dataRanges on a real sparse file: exactly the blocks written (model and qemu-img map agree), fallocated space is a hole, later writes show at once', async () => {
  await requireTools('qemu-img')
  const rnd = new Random(1717)
  const size = 16 * MiB + 1536 // a partial last block too
  const path = join(T, 'sparse.img')
  const dev = await FileDevice.open(path, { create: size })
  try {
    const model = new UnitModel(size, BLOCK)
    for (let i = 0; i < 40; i++) {
      const length = 1 + rnd.int(3 * BLOCK)
      const offset = rnd.int(size - length)
      await dev.write(new Uint8Array(length).fill(1 + (i % 255)), offset)
      model.mark(offset, length)
    }
    // Space reserved but never written reads as zeros: a hole for backup tools, as for qemu.
    await runOk('fallocate', ['-o', String(12 * MiB), '-l', String(256 * KiB), path])
    await dev.flush()
    assert.deepEqual(await dev.dataRanges(0, size), model.ranges(), 'FIEMAP map against the model')
    assert.deepEqual(await dev.dataRanges(0, size), await qemuData(path), 'against qemu-img map (SEEK_DATA)')

    // Writes after the map was cached, into holes (one into the fallocated range): never a hole.
    for (const offset of [5 * MiB + 3, 12 * MiB + 8192, size - 10]) {
      const length = Math.min(5000, size - offset)
      await dev.write(new Uint8Array(length).fill(9), offset)
      model.mark(offset, length)
      const data = await dev.dataRanges(0, size)
      for (const [s, e] of model.ranges()) {
        assert.ok(data.some(([a, b]) => a <= s && b >= e), `written range [${s}, ${e}) reported as data after the map was cached`)
      }
    }
    // A discard is counted as a write (zeros written, or a truncated tail): data, never lost.
    await dev.discard(7 * MiB, BLOCK)
    model.mark(7 * MiB, BLOCK)
    assert.deepEqual(await dev.dataRanges(0, size), model.ranges(), 'the overlay is exact at block granularity')
  } finally {
    await dev.close()
  }
})

test('a file system without FIEMAP (tmpfs) reports everything as data', { skip: !(await stat('/dev/shm').catch(() => null)) }, async () => {
  const dir = await mkdtemp('/dev/shm/blocksnap-allocation-')
  try {
    const dev = await FileDevice.open(join(dir, 'x.img'), { create: MiB })
    await dev.write(new Uint8Array(10).fill(1), 4096)
    assert.deepEqual(await dev.dataRanges(0, MiB), [[0, MiB]])
    await dev.close()
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})

test('volume allocation: origin = its file; snapshot = its exceptions plus the origin (seeded model)', async () => {
  const dir = join(T, 'vol')
  const size = 8 * MiB
  await Volume.create(dir, { sizeBytes: size })
  const volume = await Volume.open(dir)
  try {
    const rnd = new Random(99)
    const origin = new UnitModel(size, BLOCK)
    const write = async (offset: number, length: number, snapshot: string | null) => {
      await volume.device(snapshot).write(new Uint8Array(length).fill(0xab), offset)
    }
    for (let i = 0; i < 10; i++) {
      const offset = rnd.int(size - 8192)
      await write(offset, 3000, null)
      origin.mark(offset, 3000)
    }
    await volume.createSnapshot('s', { chunkSizeBytes: 16 * KiB })
    const exceptions = new UnitModel(size, 16 * KiB)
    for (let i = 0; i < 10; i++) {
      const offset = rnd.int(size - 8192)
      const onSnapshot = i % 3 === 0
      await write(offset, 2000, onSnapshot ? 's' : null)
      if (!onSnapshot) origin.mark(offset, 2000)
      exceptions.mark(offset, 2000)
    }
    await volume.origin.flush()
    const dataOf = (extents: Array<{ offset: number; length: number; data: boolean }>) => extents.filter((e) => e.data).map((e): [number, number] => [e.offset, e.offset + e.length])
    assert.deepEqual(dataOf(await allocationExtents(volume, null, 0, size)), origin.ranges(), 'origin')
    const snapModel = new UnitModel(size, BLOCK)
    for (const [s, e] of [...origin.ranges(), ...exceptions.ranges()]) snapModel.mark(s, e - s)
    assert.deepEqual(dataOf(await allocationExtents(volume, 's', 0, size)), snapModel.ranges(), 'snapshot')
    // Windows: the same answer clipped.
    const window = await allocationExtents(volume, 's', 1000, 3 * MiB)
    assert.equal(window[0]!.offset, 1000)
    assert.equal(window.reduce((n, e) => n + e.length, 0), 3 * MiB)
  } finally {
    await volume.close()
  }
})
