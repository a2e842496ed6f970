/**
 * Diff cost at 10^6 exceptions: kernel-format persistent COWs holding N exceptions each,
 * scattered at random over a sparse 64 GiB origin (4 KiB chunks), one data chunk in 1000
 * made to differ. Measures Snapshot.exceptionRanges() and diffViews() for snapshot vs origin
 * and snapshot vs snapshot (the union of both tables: 2N candidates).
 *
 *   npx tsx bench/diff.ts [--n 1000000] [--origin-only]
 */
import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FileDevice } from '../src/device/file-device.js'
import { writeEntry } from '../src/format/area.js'
import { encodeHeader } from '../src/format/header.js'
import { FORMAT_VERSION, areaChunk, dataChunkOfEntry, layoutFor } from '../src/format/layout.js'
import { Origin } from '../src/snapshot/origin.js'
import { Snapshot } from '../src/snapshot/snapshot.js'
import { PersistentStore } from '../src/store/persistent-store.js'
import { diffViews } from '../src/backup/diff.js'
import { permuter } from './permuter.js'

const CHUNK = 4096
const BITS = 24 // 2^24 chunks of 4 KiB: a 64 GiB origin
const k = process.argv.indexOf('--n')
const N = k >= 0 ? Number(process.argv[k + 1]) : 1_000_000

/** A COW with `n` exceptions old = oldOf(i); data chunks sparse except every 1000th, which holds 0xff. */
function writeCow(path: string, n: number, oldOf: (i: number) => number): void {
  const layout = layoutFor(CHUNK)
  const fd = openSync(path, 'w')
  const header = encodeHeader({ valid: true, version: FORMAT_VERSION, chunkSizeSectors: CHUNK / 512 }, CHUNK)
  writeSync(fd, header, 0, header.length, 0)
  const area = new Uint8Array(CHUNK)
  const marked = new Uint8Array(CHUNK).fill(0xff)
  let i = 0
  let lastChunk = 1
  for (let a = 0; ; a++) {
    area.fill(0)
    let e = 0
    for (; e < layout.exceptionsPerArea && i < n; e++, i++) {
      const newChunk = dataChunkOfEntry(layout, a, e)
      writeEntry(area, e, oldOf(i), newChunk)
      if (i % 1000 === 0) writeSync(fd, marked, 0, CHUNK, newChunk * CHUNK)
      lastChunk = newChunk
    }
    const at = areaChunk(layout, a)
    writeSync(fd, area, 0, CHUNK, at * CHUNK)
    lastChunk = Math.max(lastChunk, at)
    if (e < layout.exceptionsPerArea) break
  }
  ftruncateSync(fd, (lastChunk + 1) * CHUNK)
  closeSync(fd)
}

async function timed<T>(fn: () => Promise<T> | T): Promise<[number, T]> {
  const t = process.hrtime.bigint()
  const r = await fn()
  return [Number(process.hrtime.bigint() - t) / 1e9, r]
}

const dir = mkdtempSync(join(tmpdir(), 'blocksnap-bench-diff-'))
try {
  const originPath = join(dir, 'origin.img')
  const fd = openSync(originPath, 'w')
  ftruncateSync(fd, 2 ** BITS * CHUNK)
  closeSync(fd)
  writeCow(join(dir, 'a.cow'), N, permuter(BITS, 0x1234567))
  writeCow(join(dir, 'b.cow'), N, permuter(BITS, 0x7654321))
  const origin = new Origin(await FileDevice.open(originPath))
  const snaps: Snapshot[] = []
  for (const name of ['a', 'b']) {
    const snap = new Snapshot({ name, store: new PersistentStore(await FileDevice.open(join(dir, `${name}.cow`)), { chunkBytes: CHUNK }) })
    const [s] = await timed(() => origin.addSnapshot(snap))
    console.log(`open ${name}: ${N} exceptions in ${s.toFixed(2)} s`)
    snaps.push(snap)
  }
  const [a, b] = snaps as [Snapshot, Snapshot]
  const [sr, ranges] = await timed(() => a.exceptionRanges())
  console.log(`exceptionRanges: ${ranges.length} ranges in ${sr.toFixed(3)} s`)
  const [s1, d1] = await timed(() => diffViews(a, origin, origin.sizeBytes))
  console.log(`diff a vs origin: ${N} candidate chunks, ${d1.extents.length} extents, ${s1.toFixed(2)} s (${((N * CHUNK) / s1 / 1048576).toFixed(0)} MiB/s of candidates per side)`)
  if (process.argv.includes('--origin-only')) {
    await origin.close()
    process.exit(0)
  }
  const [s2, d2] = await timed(() => diffViews(a, b, origin.sizeBytes))
  console.log(`diff a vs b: ~${2 * N} candidate chunks, ${d2.extents.length} extents, ${s2.toFixed(2)} s`)
  await origin.close()
} finally {
  rmSync(dir, { recursive: true, force: true })
}
