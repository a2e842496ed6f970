/**
 * Range queries over an ExceptionTable, which is a hash: the complete exceptions whose origin
 * chunks fall in a window, as runs sorted by origin chunk. Costs the smaller of the window's
 * chunk count (probing run by run) and the table's run count (one pass and a sort), so a map of
 * a huge, mostly unchanged volume does not probe every chunk, nor a small window scan the table.
 */
import type { ExceptionTable } from './exception-table.js'

export interface ChunkRun {
  /** First origin chunk. */
  readonly oldChunk: number
  /** COW chunk holding `oldChunk`; origin chunk oldChunk+k is in COW chunk newChunk+k. */
  readonly newChunk: number
  /** Chunks in the run, >= 1. */
  readonly chunks: number
}

export function exceptionRunsIn(table: ExceptionTable, firstChunk: number, endChunk: number): ChunkRun[] {
  const found: ChunkRun[] = []
  const clip = (old: number, cow: number, count: number) => {
    const from = Math.max(old, firstChunk)
    const to = Math.min(old + count, endChunk)
    if (to > from) found.push({ oldChunk: from, newChunk: cow + (from - old), chunks: to - from })
  }
  if (endChunk - firstChunk <= table.runCount) {
    for (let chunk = firstChunk; chunk < endChunk; ) {
      const run = table.lookupRun(chunk)
      if (run === null) {
        chunk++
        continue
      }
      clip(run.old, run.new, run.count + 1)
      chunk = run.old + run.count + 1
    }
  } else {
    for (const run of table.runs()) clip(run.old, run.new, run.count + 1)
    found.sort((a, b) => a.oldChunk - b.oldChunk)
  }
  // Runs stop at the table's 256-chunk groups; join those that continue each other.
  const out: ChunkRun[] = []
  for (const run of found) {
    const last = out[out.length - 1]
    if (last && last.oldChunk + last.chunks === run.oldChunk && last.newChunk + last.chunks === run.newChunk) {
      out[out.length - 1] = { ...last, chunks: last.chunks + run.chunks }
    } else out.push(run)
  }
  return out
}
