/**
 * JavaScript work per MiB of first-touch writes (issue 15's floor: ≥ 10× fewer than on main before
 * the extent engine). The engine runs in this process — a Volume over FileDevices in the scratch
 * directory, no NBD — and each case writes every chunk of a fresh region once, then flushes, so the
 * copies and their commits fall inside the measure. Two figures per case, from two identical passes:
 *
 * - async resources created, by type (PROMISE above all), counted by an async_hooks init hook;
 * - bytes allocated on the V8 heap: heap used after minus before, plus what every GC in between
 *   freed (v8.GCProfiler reports each GC's before and after). Measured in a pass without the hook,
 *   because enabling promise hooks changes what V8 allocates.
 *
 * A warm-up region is written first in each pass so that compilation and first-use allocations do
 * not count. Buffers handed to the engine (ArrayBuffer backing stores) are outside the V8 heap
 * and not counted; the objects around them are.
 *
 * bench/baseline-js-work.json holds the same figures from main before the extent engine; each run
 * reports "times fewer" against it. `--record-js-baseline` rewrites it from this run.
 * Options: --js-mib N (MiB written per case and pass, default 32).
 */
import { createHook } from 'node:async_hooks'
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { GCProfiler, getHeapStatistics } from 'node:v8'
import { Volume } from '../../src/volume/volume.js'
import { option } from '../lib/args.js'
import type { BenchContext, Results } from '../lib/context.js'
import { log } from '../lib/log.js'
import { BENCH_DIR } from '../lib/paths.js'
import { run } from '../lib/proc.js'
import type { FloorRow, Suite } from '../lib/suite.js'
import { KiB, MiB } from '../lib/units.js'
import { fmt, k } from '../report/format.js'

export const BASELINE_PATH = join(BENCH_DIR, 'baseline-js-work.json')
const WARM_BYTES = 8 * MiB
/** Floor of issue 15, in times fewer than the baseline. */
const FLOOR_TIMES_FEWER = 10

interface Pattern {
  readonly key: string
  readonly writeBytes: number
  readonly queueDepth: number
  readonly random: boolean
}

const PATTERNS: readonly Pattern[] = [
  { key: 'random 4K QD32', writeBytes: 4 * KiB, queueDepth: 32, random: true },
  { key: 'sequential 1M QD8', writeBytes: MiB, queueDepth: 8, random: false },
]

const CONFIGS = [
  { key: '0 snap', snapshots: 0, chunkBytes: 4096 },
  { key: '1 snap 4K', snapshots: 1, chunkBytes: 4096 },
] as const

/** The configuration the floor is about. */
const FLOOR_CONFIG = '1 snap 4K'

export interface JsWorkCase {
  config: string
  pattern: string
  measuredBytes: number
  writes: number
  promisesPerMiB: number
  /** Every async resource type the hook saw, per MiB. */
  asyncResourcesPerMiB: Record<string, number>
  heapBytesPerMiB: number
  /**
   * CPU time of this process (user + system, process.cpuUsage) per MiB in the heap pass: the
   * main thread and the I/O threads together, so it is a load-independent cost, unlike seconds.
   * Absent from baselines recorded before it was measured.
   */
  cpuMsPerMiB?: number
  gcs: number
  /** Wall time of the heap pass (no hook), for orientation only. */
  seconds: number
}

export interface JsWorkResults {
  measuredMiB: number
  method: string
  cases: JsWorkCase[]
  /** The baseline the ratios are against, as read at run time (the report needs nothing else). */
  baseline: Baseline | null
}

interface Baseline {
  recordedAt: string
  commit: string
  /** Tree id of src/ (git rev-parse HEAD:src), and whether src/ had uncommitted changes: which engine was measured. */
  srcTree: string
  node: string
  measuredMiB: number
  method: string
  cases: JsWorkCase[]
}

const METHOD = 'in-process Volume over FileDevices, write-back default; each chunk of a fresh region written once, then flush; ' +
  'promises: async_hooks init count; heap bytes: v8.GCProfiler (used after - used before + freed by each GC), separate pass without hooks; ' +
  'CPU: process.cpuUsage (user + system, every thread) over that pass'

/** Offsets of the measured region's writes: every write-sized block once, shuffled when random (seeded, replayable). */
function writeOffsets(pattern: Pattern, startBytes: number, lengthBytes: number): number[] {
  const n = lengthBytes / pattern.writeBytes
  const offsets = Array.from({ length: n }, (_, i) => startBytes + i * pattern.writeBytes)
  if (pattern.random) {
    let state = 0x2545f491
    for (let i = n - 1; i > 0; i--) {
      state = (Math.imul(state, 1664525) + 1013904223) >>> 0
      const j = state % (i + 1)
      ;[offsets[i], offsets[j]] = [offsets[j] as number, offsets[i] as number]
    }
  }
  return offsets
}

interface Writer {
  write(data: Uint8Array, offset: number): Promise<void>
  flush(): Promise<void>
}

/** `queueDepth` writers in flight until every offset is written, then one flush. */
async function firstTouch(device: Writer, pattern: Pattern, views: readonly Uint8Array[], offsets: readonly number[]): Promise<void> {
  let next = 0
  const worker = async () => {
    while (next < offsets.length) {
      const i = next++
      await device.write(views[i % views.length] as Uint8Array, offsets[i] as number)
    }
  }
  await Promise.all(Array.from({ length: pattern.queueDepth }, worker))
  await device.flush()
}

type Measure = 'promises' | 'heap'

interface PassResult {
  counts: Map<string, number>
  heapBytes: number
  cpuMs: number
  gcs: number
  seconds: number
}

async function pass(ctx: BenchContext, config: (typeof CONFIGS)[number], pattern: Pattern, measuredBytes: number, measure: Measure, seq: number): Promise<PassResult> {
  const dir = join(ctx.workDir, `jswork-${seq}-${measure}`)
  await Volume.create(dir, { sizeBytes: WARM_BYTES + measuredBytes })
  const volume = await Volume.open(dir)
  try {
    for (let i = 0; i < config.snapshots; i++) await volume.createSnapshot(`s${i}`, { chunkSizeBytes: config.chunkBytes })
    const origin = volume.device(null)
    // Distinct data per view so nothing downstream can share buffers; views made before measuring.
    const source = new Uint8Array(pattern.writeBytes * 16)
    for (let i = 0; i < source.length; i += 4096) source[i] = (i / 4096) & 0xff
    const views = Array.from({ length: 16 }, (_, i) => source.subarray(i * pattern.writeBytes, (i + 1) * pattern.writeBytes))
    await firstTouch(origin, pattern, views, writeOffsets(pattern, 0, WARM_BYTES))
    const offsets = writeOffsets(pattern, WARM_BYTES, measuredBytes)
    const counts = new Map<string, number>()
    const t0 = performance.now()
    if (measure === 'promises') {
      const hook = createHook({ init: (_id, type) => void counts.set(type, (counts.get(type) ?? 0) + 1) })
      hook.enable()
      try {
        await firstTouch(origin, pattern, views, offsets)
      } finally {
        hook.disable()
      }
      return { counts, heapBytes: NaN, cpuMs: NaN, gcs: 0, seconds: (performance.now() - t0) / 1000 }
    }
    const profiler = new GCProfiler()
    profiler.start()
    const usedBefore = getHeapStatistics().used_heap_size
    const cpuBefore = process.cpuUsage()
    await firstTouch(origin, pattern, views, offsets)
    const cpu = process.cpuUsage(cpuBefore)
    const usedAfter = getHeapStatistics().used_heap_size
    const seconds = (performance.now() - t0) / 1000
    const gcs = profiler.stop().statistics
    const freed = gcs.reduce((sum, g) => sum + (g.beforeGC.heapStatistics.usedHeapSize - g.afterGC.heapStatistics.usedHeapSize), 0)
    return { counts, heapBytes: usedAfter - usedBefore + freed, cpuMs: (cpu.user + cpu.system) / 1000, gcs: gcs.length, seconds }
  } finally {
    await volume.close()
    rmSync(dir, { recursive: true, force: true })
  }
}

export async function measureJsWork(ctx: BenchContext, measuredMiB: number): Promise<JsWorkCase[]> {
  const measuredBytes = measuredMiB * MiB
  const cases: JsWorkCase[] = []
  let seq = 0
  for (const pattern of PATTERNS) {
    for (const config of CONFIGS) {
      seq++
      const counted = await pass(ctx, config, pattern, measuredBytes, 'promises', seq)
      const heap = await pass(ctx, config, pattern, measuredBytes, 'heap', seq)
      const perMiB = (x: number) => Number((x / measuredMiB).toFixed(1))
      const c: JsWorkCase = {
        config: config.key,
        pattern: pattern.key,
        measuredBytes,
        writes: measuredBytes / pattern.writeBytes,
        promisesPerMiB: perMiB(counted.counts.get('PROMISE') ?? 0),
        asyncResourcesPerMiB: Object.fromEntries([...counted.counts].sort((a, b) => b[1] - a[1]).map(([type, n]) => [type, perMiB(n)])),
        heapBytesPerMiB: Math.round(heap.heapBytes / measuredMiB),
        cpuMsPerMiB: Number((heap.cpuMs / measuredMiB).toFixed(2)),
        gcs: heap.gcs,
        seconds: Number(heap.seconds.toFixed(3)),
      }
      log(`  js work ${c.config.padEnd(10)} ${c.pattern.padEnd(18)} ${k(c.promisesPerMiB).padStart(7)} promises/MiB ${fmt(c.heapBytesPerMiB / KiB, 0).padStart(7)} KiB heap/MiB ${fmt(c.cpuMsPerMiB ?? NaN).padStart(6)} CPU ms/MiB (${c.gcs} GCs, ${fmt(c.seconds)} s)`)
      cases.push(c)
    }
  }
  return cases
}

function readBaseline(): Baseline | null {
  return existsSync(BASELINE_PATH) ? (JSON.parse(readFileSync(BASELINE_PATH, 'utf8')) as Baseline) : null
}

function git(...argv: string[]): string {
  const r = run('git', ['-C', BENCH_DIR, ...argv], { allowFail: true })
  return r.status === 0 ? r.stdout.trim() : 'unknown'
}

function srcTree(): string {
  const dirty = git('status', '--porcelain', '--', '../src') !== ''
  return `${git('rev-parse', '--short', 'HEAD:src')}${dirty ? ' (with uncommitted changes)' : ''}`
}

const jsWork = (results: Results) => results.jsWork as JsWorkResults | null

const findCase = (cases: readonly JsWorkCase[], config: string, pattern: string) => cases.find((c) => c.config === config && c.pattern === pattern)

/** How many times fewer than the baseline (NaN without one). */
function timesFewer(base: number | undefined, now: number | undefined): number {
  return base !== undefined && now !== undefined && now > 0 ? base / now : NaN
}

function floors(results: Results): FloorRow[] {
  const r = jsWork(results)
  if (!r) return []
  const baseline = r.baseline
  return PATTERNS.map((p) => {
    const now = findCase(r.cases, FLOOR_CONFIG, p.key)
    const base = baseline ? findCase(baseline.cases, FLOOR_CONFIG, p.key) : undefined
    const heapRatio = timesFewer(base?.heapBytesPerMiB, now?.heapBytesPerMiB)
    return {
      what: `JavaScript work per MiB of first-touch, ${p.key}, ${FLOOR_CONFIG} snapshot: promises, times fewer than the baseline (bench/baseline-js-work.json)`,
      floor: `≥ ${FLOOR_TIMES_FEWER}`,
      ok: (x) => x >= FLOOR_TIMES_FEWER,
      ratios: [timesFewer(base?.promisesPerMiB, now?.promisesPerMiB)],
      raw:
        `${k(now?.promisesPerMiB ?? NaN)} vs ${k(base?.promisesPerMiB ?? NaN)} promises/MiB; ` +
        `heap ${fmt((now?.heapBytesPerMiB ?? NaN) / KiB, 0)} vs ${fmt((base?.heapBytesPerMiB ?? NaN) / KiB, 0)} KiB/MiB (${fmt(heapRatio, 1)}× fewer)`,
    }
  })
}

function section(results: Results): string[] {
  const r = jsWork(results)
  if (!r) return []
  const baseline = r.baseline
  const lines = ['## JavaScript work per MiB of first-touch (in-process)', '']
  lines.push(`Method: ${r.method}; ${r.measuredMiB} MiB per case. Baseline: ${baseline ? `${baseline.commit}, recorded ${baseline.recordedAt}` : 'none recorded'}.`)
  lines.push('')
  lines.push('| Config | Pattern | Promises/MiB | × fewer | Heap KiB/MiB | × fewer | CPU ms/MiB (baseline) | Other async resources/MiB |')
  lines.push('| --- | --- | --- | --- | --- | --- | --- | --- |')
  for (const c of r.cases) {
    const base = baseline ? findCase(baseline.cases, c.config, c.pattern) : undefined
    const others = Object.entries(c.asyncResourcesPerMiB).filter(([type]) => type !== 'PROMISE')
    lines.push(
      `| ${c.config} | ${c.pattern} | ${k(c.promisesPerMiB)} | ${fmt(timesFewer(base?.promisesPerMiB, c.promisesPerMiB), 1)} | ` +
        `${fmt(c.heapBytesPerMiB / KiB, 0)} | ${fmt(timesFewer(base?.heapBytesPerMiB, c.heapBytesPerMiB), 1)} | ` +
        `${fmt(c.cpuMsPerMiB ?? NaN)}${base?.cpuMsPerMiB === undefined ? '' : ` (${fmt(base.cpuMsPerMiB)})`} | ` +
        `${others.map(([type, n]) => `${type} ${k(n)}`).join(', ') || '—'} |`,
    )
  }
  lines.push('')
  return lines
}

export const jsWorkSuite: Suite = {
  name: 'jswork',
  usesPeers: false,
  initialResults: () => ({ jsWork: null }),
  async run(ctx) {
    const measuredMiB = Number(option(ctx.argv, '--js-mib') ?? 32)
    if (!Number.isSafeInteger(measuredMiB) || measuredMiB <= 0) throw new Error(`--js-mib needs a positive whole number of MiB, got ${measuredMiB}`)
    log(`JavaScript work per MiB of first-touch, ${measuredMiB} MiB per case`)
    const cases = await measureJsWork(ctx, measuredMiB)
    if (ctx.argv.includes('--record-js-baseline')) {
      const baseline: Baseline = { recordedAt: new Date().toISOString(), commit: git('log', '-1', '--format=%h %s'), srcTree: srcTree(), node: process.version, measuredMiB, method: METHOD, cases }
      writeFileSync(BASELINE_PATH, JSON.stringify(baseline, null, 1) + '\n')
      log(`  baseline written to ${BASELINE_PATH}`)
    }
    ctx.results.jsWork = { measuredMiB, method: METHOD, cases, baseline: readBaseline() } satisfies JsWorkResults
  },
  floors,
  section,
}
