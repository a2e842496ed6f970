/** The shared origin image, copies of it, and blocksnap volumes made from it. */
import { closeSync, openSync, rmSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import { Volume } from '../../src/volume/volume.js'
import type { BenchContext } from './context.js'
import { run } from './proc.js'
import { MiB } from './units.js'

/** `size` bytes of a pattern no block of which repeats, so nothing compresses or dedups. */
export function makeBase(path: string, size: number): void {
  const fd = openSync(path, 'w')
  const piece = Buffer.alloc(MiB)
  for (let i = 0; i < piece.length; i += 4) piece.writeUInt32LE(((Math.imul(i + 1, 0x9e3779b1) | 1) >>> 0), i)
  for (let at = 0; at < size; at += MiB) {
    piece.writeUInt32LE(at / MiB, 0)
    writeSync(fd, piece, 0, Math.min(MiB, size - at), at)
  }
  closeSync(fd)
}

export function copy(from: string, to: string): void {
  rmSync(to, { force: true })
  run('cp', ['--sparse=always', from, to])
}

export function syncAll(): void {
  run('sync', [])
}

let volSeq = 0

/** A volume over a copy of the base image with `snapshots` snapshots of `chunk` bytes. */
export async function makeVolume(ctx: BenchContext, snapshots: number, chunk: number): Promise<string> {
  const dir = join(ctx.workDir, `vol${++volSeq}`)
  await Volume.create(dir, { fromImage: ctx.baseImage })
  if (snapshots > 0) {
    const v = await Volume.open(dir)
    try {
      for (let i = 0; i < snapshots; i++) await v.createSnapshot(`s${i}`, { chunkSizeBytes: chunk })
    } finally {
      await v.close()
    }
  }
  syncAll()
  return dir
}

export function dropVolume(dir: string): void {
  rmSync(dir, { recursive: true, force: true })
}
