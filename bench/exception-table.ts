/**
 * ExceptionTable scale bench: bytes per exception and insert/lookup rates at 1e6, 1e7, 1e8.
 *
 *   npx tsx bench/exception-table.ts [--max 100000000]
 *
 * Cases (new = i everywhere, like the store's sequential COW allocation):
 * - sparse: old is a bijective scramble of i over 2^44, so every exception is its own run and
 *   its own group: the uncompressible worst case for memory.
 * - dense: old is a bijective scramble of i over 2^k >= 2.5 N (a device ~40% written at random):
 *   still uncompressible, but many runs share a group, i.e. share a probe cluster.
 * - sequential: old = new = i, the best case (256 chunks per run).
 * Writes bench/results-exception-table.json next to this file.
 */
import { writeFileSync } from 'node:fs'
import { cpus } from 'node:os'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { ExceptionTable } from '../src/snapshot/exception-table.js'
import { permuter } from './permuter.js'

// A real gc() without asking for --expose-gc on the command line, so arrayBuffers deltas are
// measured after the growth garbage is gone.
setFlagsFromString('--expose-gc')
const rawGc = runInNewContext('gc') as () => void
// V8 frees ArrayBuffer backing stores on a background sweeper: collect, yield, collect again
// so the arrayBuffers figure no longer counts the arrays a growth left behind.
async function gc(): Promise<void> {
  rawGc()
  await new Promise((resolve) => setTimeout(resolve, 50))
  rawGc()
}

const SIZES = [1e6, 1e7, 1e8]
const LOOKUPS = 2_000_000

function parseMax(argv: string[]): number {
  const k = argv.indexOf('--max')
  if (k < 0) return 1e8
  const v = Number(argv[k + 1])
  if (!Number.isFinite(v) || v <= 0) throw new Error(`--max needs a positive number, got ${argv[k + 1]}`)
  return v
}

interface CaseResult {
  case: string
  n: number
  runs: number
  runsPerException: number
  memoryBytes: number
  bytesPerException: number
  arrayBuffersRisePerException: number
  insertsPerSec: number
  lookupHitsPerSec: number
  lookupMissesPerSec: number
}

async function runCase(
  name: string,
  n: number,
  oldOf: (i: number) => number,
  missOf: (j: number) => number,
): Promise<CaseResult> {
  await gc()
  const before = process.memoryUsage().arrayBuffers
  let table: ExceptionTable | null = new ExceptionTable()
  const t0 = performance.now()
  for (let i = 0; i < n; i++) table.insert(oldOf(i), i)
  const insertMs = performance.now() - t0
  await gc()
  const rise = process.memoryUsage().arrayBuffers - before

  // hits in random order, so the bench pays the cache misses a real read pattern would
  const pickHit = permuter(32, 0x1234567)
  const m = Math.min(LOOKUPS, n)
  let check = 0
  const t1 = performance.now()
  for (let j = 0; j < m; j++) {
    const i = pickHit(j) % n
    const got = table.lookup(oldOf(i))
    if (got !== i) throw new Error(`${name}: lookup of #${i} returned ${got}`)
    check++
  }
  const hitMs = performance.now() - t1
  const t2 = performance.now()
  for (let j = 0; j < m; j++) if (table.lookup(missOf(j)) !== -1) throw new Error(`${name}: miss #${j} hit`)
  const missMs = performance.now() - t2

  const result: CaseResult = {
    case: name,
    n,
    runs: table.runCount,
    runsPerException: table.runCount / n,
    memoryBytes: table.memoryBytes(),
    bytesPerException: table.memoryBytes() / n,
    arrayBuffersRisePerException: rise / n,
    insertsPerSec: n / (insertMs / 1000),
    lookupHitsPerSec: check / (hitMs / 1000),
    lookupMissesPerSec: m / (missMs / 1000),
  }
  table = null
  await gc()
  return result
}

function fmtRate(r: number): string {
  return r >= 1e6 ? `${(r / 1e6).toFixed(2)} M/s` : `${(r / 1e3).toFixed(0)} k/s`
}

async function main(): Promise<void> {
  const max = parseMax(process.argv.slice(2))
  const results: CaseResult[] = []
  const notes: string[] = []
  for (const n of SIZES) {
    if (n > max) {
      const note = `skipped N = ${n.toExponential(0)}: above --max ${max}`
      notes.push(note)
      console.log(note)
      continue
    }
    // sparse: 32 scrambled bits pick the group region, 12 more bits the chunk inside it
    const hi = permuter(32, 0x0badf00d)
    const lo = permuter(32, 0x51ed270b)
    const sparse = (i: number) => hi(i) * 4096 + (lo(i) % 4096)
    results.push(await runCase('sparse random', n, sparse, (j) => sparse(n + j)))

    const bits = Math.ceil(Math.log2(n * 2.5))
    const dense = permuter(bits, 0x2f0e1d3c)
    results.push(await runCase(`dense random (2^${bits} chunks)`, n, dense, (j) => dense(n + j)))

    results.push(await runCase('sequential', n, (i) => i, (j) => n + j))
    console.error(`done N = ${n.toExponential(0)}`)
  }

  const rows = results.map(
    (r) =>
      `| ${r.case} | ${r.n.toExponential(0)} | ${r.runsPerException.toFixed(4)} | ${r.bytesPerException.toFixed(2)} | ` +
      `${r.arrayBuffersRisePerException.toFixed(2)} | ${fmtRate(r.insertsPerSec)} | ${fmtRate(r.lookupHitsPerSec)} | ${fmtRate(r.lookupMissesPerSec)} |`,
  )
  console.log(
    [
      '| case | N | runs/exception | memoryBytes/N | arrayBuffers rise/N | inserts | lookup hits | lookup misses |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |',
      ...rows,
    ].join('\n'),
  )
  const out = new URL('./results-exception-table.json', import.meta.url)
  const env = { node: process.version, cpu: cpus()[0]?.model ?? 'unknown', date: new Date().toISOString() }
  writeFileSync(out, JSON.stringify({ env, lookupsPerCase: LOOKUPS, notes, results }, null, 2) + '\n')
  console.log(`wrote ${out.pathname}`)
}

await main()
