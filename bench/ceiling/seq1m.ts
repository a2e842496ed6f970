/**
 * The I/O ceiling of first-touch sequential writes over persistent snapshots: the rate that the
 * job's own I/O reaches in this process with no engine, no NBD and no bookkeeping at all.
 *
 * For every chunk written for the first time, each snapshot's COW must get the chunk's old bytes,
 * those bytes must be durable before the metadata area that names them, and that area must be
 * durable before the new bytes reach the origin (dm-snapshot's ordering; blocksnap keeps it). So
 * per window of held writes: read the old bytes once, write them to every COW, flush every COW,
 * write every COW's areas, flush again, then write the origin. Windows run side by side, holding
 * no more than the engine's write-back budget in all; the best of a few window shapes counts.
 *
 * A floor above `ceiling / no-snapshot figure` is out of reach for any engine on this machine:
 * the no-snapshot figure comes over NBD, which only adds work on the snapshot side.
 */
import type { FileHandle } from 'node:fs/promises'
import { open, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { DEFAULT_WRITE_BACK_BYTES } from '../../src/snapshot/origin.js'
import { MiB } from '../lib/units.js'

/** Bytes of one on-disk exception (old chunk, new chunk: two little-endian u64). */
const EXCEPTION_BYTES = 16

/** Window shapes (MiB per window × windows in flight), each holding the write-back budget. */
function shapes(): Array<{ windowMiB: number; windows: number }> {
  const budgetMiB = Math.max(1, Math.floor(DEFAULT_WRITE_BACK_BYTES / MiB))
  return [1, 2, 4, 8, 16].filter((w) => w <= budgetMiB).map((windowMiB) => ({ windowMiB, windows: Math.max(1, Math.floor(budgetMiB / windowMiB)) }))
}

export interface CeilingOptions {
  readonly workDir: string
  /** A copy of the origin the jobs run on; its bytes in [offsetBytes, offsetBytes + sizeBytes) are overwritten. */
  readonly originPath: string
  readonly offsetBytes: number
  readonly sizeBytes: number
  readonly snapshots: number
  readonly chunkBytes: number
}

export interface Ceiling {
  readonly mibps: number
  readonly windowMiB: number
  readonly windows: number
}

/** Where exception `index` of a persistent COW lands: header chunk, then areas each followed by their data chunks. */
function layout(chunkBytes: number) {
  const perArea = chunkBytes / EXCEPTION_BYTES
  const areaChunk = (area: number) => 1 + area * (perArea + 1)
  return {
    perArea,
    areaChunk,
    dataChunk: (index: number) => areaChunk(Math.floor(index / perArea)) + 1 + (index % perArea),
  }
}

async function oneShape(o: CeilingOptions, windowMiB: number, windows: number): Promise<number> {
  const { perArea, areaChunk, dataChunk } = layout(o.chunkBytes)
  const chunksPerMiB = MiB / o.chunkBytes
  const pieces = Math.floor(o.sizeBytes / MiB)
  const origin = await open(o.originPath, 'r+')
  const cows: FileHandle[] = []
  try {
    for (let s = 0; s < o.snapshots; s++) {
      const path = join(o.workDir, `ceiling-${s}.cow`)
      await rm(path, { force: true })
      const cow = await open(path, 'w+')
      cows.push(cow)
      await cow.write(Buffer.alloc(o.chunkBytes, 1), 0, o.chunkBytes, 0)
      await cow.datasync()
    }
    const fresh = Buffer.alloc(MiB, 0x5a)
    const areaImage = Buffer.alloc(o.chunkBytes, 0x11)
    const windowCount = Math.ceil(pieces / windowMiB)
    let next = 0
    const started = performance.now()
    const oneWindow = async (w: number) => {
      const first = w * windowMiB
      const last = Math.min(pieces, first + windowMiB)
      const ids = Array.from({ length: last - first }, (_, i) => first + i)
      // Old bytes to every COW, split where a metadata area interrupts the data chunks.
      await Promise.all(ids.map(async (piece) => {
        const old = Buffer.allocUnsafe(MiB)
        await origin.read(old, 0, MiB, o.offsetBytes + piece * MiB)
        const writes: Array<Promise<unknown>> = []
        for (let at = 0; at < chunksPerMiB; ) {
          const index = piece * chunksPerMiB + at
          const run = Math.min(chunksPerMiB - at, perArea - (index % perArea))
          for (const cow of cows) writes.push(cow.write(old, at * o.chunkBytes, run * o.chunkBytes, dataChunk(index) * o.chunkBytes))
          at += run
        }
        await Promise.all(writes)
      }))
      await Promise.all(cows.map((cow) => cow.datasync()))
      const firstArea = Math.floor((first * chunksPerMiB) / perArea)
      const lastArea = Math.floor((last * chunksPerMiB - 1) / perArea)
      const areas = Array.from({ length: lastArea - firstArea + 1 }, (_, i) => areaChunk(firstArea + i) * o.chunkBytes)
      await Promise.all(cows.flatMap((cow) => areas.map((at) => cow.write(areaImage, 0, o.chunkBytes, at))))
      await Promise.all(cows.map((cow) => cow.datasync()))
      await Promise.all(ids.map((piece) => origin.write(fresh, 0, MiB, o.offsetBytes + piece * MiB)))
    }
    await Promise.all(Array.from({ length: windows }, async () => {
      while (next < windowCount) await oneWindow(next++)
    }))
    return pieces / ((performance.now() - started) / 1000)
  } finally {
    await origin.close()
    for (const cow of cows) await cow.close()
  }
}

/** The best rate over the window shapes, in MiB/s of origin writes. */
export async function seqFirstTouchCeiling(o: CeilingOptions): Promise<Ceiling> {
  let best: Ceiling = { mibps: 0, windowMiB: 0, windows: 0 }
  for (const { windowMiB, windows } of shapes()) {
    const mibps = await oneShape(o, windowMiB, windows)
    if (mibps > best.mibps) best = { mibps, windowMiB, windows }
  }
  for (let s = 0; s < o.snapshots; s++) await rm(join(o.workDir, `ceiling-${s}.cow`), { force: true })
  return best
}
