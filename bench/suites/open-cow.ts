/** Opening a persistent COW with many exceptions (its metadata written directly in the kernel's format). */
import { closeSync, ftruncateSync, openSync, rmSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import { FileDevice } from '../../src/device/file-device.js'
import { writeEntry } from '../../src/format/area.js'
import { encodeHeader } from '../../src/format/header.js'
import { FORMAT_VERSION, areaChunk, dataChunkOfEntry, layoutFor } from '../../src/format/layout.js'
import { Origin } from '../../src/snapshot/origin.js'
import { Snapshot } from '../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../src/store/persistent-store.js'
import type { BenchContext } from '../lib/context.js'
import { log } from '../lib/log.js'
import { timed } from '../lib/proc.js'
import { permuter } from '../permuter.js'

/** Writes a kernel-format persistent COW holding `n` exceptions (data chunks left sparse). */
function writeCow(path: string, n: number, chunkBytes: number, oldOf: (i: number) => number): void {
  const layout = layoutFor(chunkBytes)
  const fd = openSync(path, 'w')
  const header = encodeHeader({ valid: true, version: FORMAT_VERSION, chunkSizeSectors: chunkBytes / 512 }, chunkBytes)
  writeSync(fd, header, 0, header.length, 0)
  const area = new Uint8Array(chunkBytes)
  let i = 0
  let k = 0
  let lastChunk = 1
  for (; i < n || k === 0 || i % layout.exceptionsPerArea === 0; k++) {
    area.fill(0)
    let e = 0
    for (; e < layout.exceptionsPerArea && i < n; e++, i++) {
      const newChunk = dataChunkOfEntry(layout, k, e)
      writeEntry(area, e, oldOf(i), newChunk)
      lastChunk = newChunk
    }
    const at = areaChunk(layout, k)
    writeSync(fd, area, 0, chunkBytes, at * chunkBytes)
    lastChunk = Math.max(lastChunk, at)
    if (e < layout.exceptionsPerArea) break
  }
  ftruncateSync(fd, (lastChunk + 1) * chunkBytes)
  closeSync(fd)
}

export async function openBench(ctx: BenchContext): Promise<Record<string, unknown>> {
  const n = ctx.args.openN
  const chunk = 4096
  const cases: Array<{ key: string; bits: number; runs: number }> = [
    // origin chunks scattered over a 8 TiB sparse origin: ~1 run per 256-chunk group
    { key: 'sparse random', bits: 31, runs: 2 },
    // ~40% of a device's chunks saved, in random order: many runs share each group
    { key: 'dense random', bits: Math.ceil(Math.log2(n * 2.5)), runs: 1 },
  ]
  const out: Record<string, unknown> = { exceptions: n, chunkBytes: chunk, note: 'page cache warm (the COW was just written); 4K chunks, 256 entries per metadata area' }
  for (const c of cases) {
    const scramble = permuter(c.bits, 0x3c6ef372)
    log(`open: a persistent COW with ${n.toExponential(0)} exceptions, ${c.key} (origin chunks over 2^${c.bits})`)
    const originPath = join(ctx.workDir, 'open-origin.img')
    const cowPath = join(ctx.workDir, 'open.cow')
    const fd = openSync(originPath, 'w')
    ftruncateSync(fd, 2 ** c.bits * chunk)
    closeSync(fd)
    const [writeSeconds] = await timed(async () => writeCow(cowPath, n, chunk, scramble))
    const measure = async () => {
      const origin = new Origin(await FileDevice.open(originPath))
      const cow = await FileDevice.open(cowPath)
      const snap = new Snapshot({ name: 'open', store: new PersistentStore(cow, { chunkBytes: chunk }) })
      const [seconds] = await timed(() => origin.addSnapshot(snap))
      const loaded = snap.table.size
      const r = { seconds, loaded, runs: snap.table.runCount, tableBytesPerException: snap.table.memoryBytes() / n }
      await origin.close()
      return r
    }
    const runs = []
    for (let r = 0; r < c.runs; r++) runs.push(await measure())
    const best = runs.reduce((a, b) => (a.seconds <= b.seconds ? a : b))
    if (best.loaded !== n) throw new Error(`open loaded ${best.loaded} exceptions, expected ${n}`)
    out[c.key] = {
      originChunksBits: c.bits,
      cowFileWriteSeconds: writeSeconds,
      secondsPerRun: runs.map((r) => r.seconds),
      exceptionsPerSecond: n / best.seconds,
      runsPerException: best.runs / n,
      tableBytesPerException: best.tableBytesPerException,
    }
    log(`  open ${c.key}: ${runs.map((r) => r.seconds.toFixed(2)).join(' s, ')} s -> ${(n / best.seconds / 1e6).toFixed(2)} M exceptions/s`)
    rmSync(originPath)
    rmSync(cowPath)
  }
  return out
}
