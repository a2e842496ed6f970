/** First-touch then rewrite on a fresh snapshot (0–8 snapshots, 4K and 64K chunks) or overlay (qcow2, nbdkit cow). */
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import type { BenchContext, Results } from '../lib/context.js'
import { copy, dropVolume, makeVolume, syncAll } from '../lib/files.js'
import { type FioResult, fio, metric, unit } from '../lib/fio.js'
import { log } from '../lib/log.js'
import { type Server, startBlocksnap, startFirstTouchCeiling, startNbdkitCow, startQemuOverlay, withServer } from '../lib/servers.js'
import type { FloorRow, Suite } from '../lib/suite.js'
import { MiB } from '../lib/units.js'
import { fmt, k, median, rawPairs } from '../report/format.js'
import { type Ceiling, seqFirstTouchCeiling } from '../ceiling/seq1m.js'

/** Per round: config -> its jobs. */
const rounds = (results: Results) => results.firstTouch as Array<Record<string, FioResult[]>>
/** Per round: config -> the I/O ceiling of its ft-seq1m job (bench/ceiling/seq1m.ts). */
const ceilingRounds = (results: Results) => results.firstTouchCeiling as Array<Record<string, Ceiling>>
/** Per round: the ft-rand4k job on the first-touch ceiling server (bench/ceiling), one 4K snapshot. */
const randCeilingRounds = (results: Results) => (results.firstTouchRandCeiling ?? []) as FioResult[]
/** The config whose ft-rand4k floors the ceiling server bounds. */
const RAND_CEILING_CONFIG = 'blocksnap 1 snap 4K'

/** The ft-rand4k job: random 4K QD32 over the first half of the device, stopped after the runtime. */
function ftRand4k(s: Server, runtimeSeconds: number): Promise<FioResult> {
  const q = Math.floor(s.sizeBytes / 4 / MiB) * MiB
  return fio(s, { name: 'ft-rand4k', rw: 'randwrite', bs: '4k', iodepth: 32, offset: 0, size: 2 * q, runtime: runtimeSeconds })
}

/** First-touch then rewrite, on a fresh snapshot (or overlay): random 4K, sequential 1M, fsync-heavy. */
async function firstTouchJobs(s: Server, runtimeSeconds: number): Promise<FioResult[]> {
  const T = runtimeSeconds
  const q = Math.floor(s.sizeBytes / 4 / MiB) * MiB
  const out: FioResult[] = []
  const ft = await ftRand4k(s, T)
  out.push(ft)
  out.push(await fio(s, { name: 'rw-rand4k', rw: 'randwrite', bs: '4k', iodepth: 32, offset: 0, size: 2 * q, ioSize: Math.max(4096, ft.ioBytes), runtime: 4 * T }))
  out.push(await fio(s, { name: 'ft-seq1m', rw: 'write', bs: '1M', iodepth: 8, offset: 2 * q, size: q, runtime: 4 * T }))
  out.push(await fio(s, { name: 'rw-seq1m', rw: 'write', bs: '1M', iodepth: 8, offset: 2 * q, size: q, runtime: 4 * T }))
  out.push(await fio(s, { name: 'ft-fsync4k', rw: 'randwrite', bs: '4k', iodepth: 32, offset: 3 * q, size: q, runtime: T, fsync: 32 }))
  return out
}

const FT_CONFIGS: Array<{ key: string; snaps: number; chunk: number }> = [
  { key: 'blocksnap 0 snap', snaps: 0, chunk: 4096 },
  { key: 'blocksnap 1 snap 4K', snaps: 1, chunk: 4096 },
  { key: 'blocksnap 4 snap 4K', snaps: 4, chunk: 4096 },
  { key: 'blocksnap 8 snap 4K', snaps: 8, chunk: 4096 },
  { key: 'blocksnap 1 snap 64K', snaps: 1, chunk: 65536 },
  { key: 'blocksnap 4 snap 64K', snaps: 4, chunk: 65536 },
  { key: 'blocksnap 8 snap 64K', snaps: 8, chunk: 65536 },
]

/** One round of every config, and the ceiling server's ft-rand4k right after the config it bounds. */
async function firstTouchRound(ctx: BenchContext, round: number): Promise<{ jobs: Record<string, FioResult[]>; randCeiling: FioResult }> {
  log(`first-touch vs rewrite, round ${round}`)
  const jobs = (s: Server) => firstTouchJobs(s, ctx.args.runtime)
  const out: Record<string, FioResult[]> = {}
  let randCeiling: FioResult | null = null
  for (const c of FT_CONFIGS) {
    const dir = await makeVolume(ctx, c.snaps, c.chunk)
    out[c.key] = await withServer(() => startBlocksnap(ctx, dir, c.key), jobs)
    dropVolume(dir)
    if (c.key === RAND_CEILING_CONFIG) randCeiling = await randCeilingRound(ctx)
  }
  out['qemu-nbd qcow2'] = await withServer(() => startQemuOverlay(ctx, ctx.baseImage, join(ctx.workDir, 'ft.qcow2')), jobs)
  rmSync(join(ctx.workDir, 'ft.qcow2'), { force: true })
  out['nbdkit cow'] = await withServer(() => startNbdkitCow(ctx, ctx.baseImage), jobs)
  return { jobs: out, randCeiling: randCeiling as FioResult }
}

/** ft-rand4k on the first-touch ceiling server, over a fresh copy of the origin. */
async function randCeilingRound(ctx: BenchContext): Promise<FioResult> {
  const originPath = join(ctx.workDir, 'ceiling-rand.origin')
  const cowPath = join(ctx.workDir, 'ceiling-rand.cow')
  copy(ctx.baseImage, originPath)
  rmSync(cowPath, { force: true })
  syncAll()
  try {
    return await withServer(() => startFirstTouchCeiling(ctx, originPath, cowPath), (s) => ftRand4k(s, ctx.args.runtime))
  } finally {
    rmSync(originPath, { force: true })
    rmSync(cowPath, { force: true })
  }
}

/** The I/O ceiling of ft-seq1m for every snapshot config that has a floor against 0 snapshots. */
async function ceilingRound(ctx: BenchContext): Promise<Record<string, Ceiling>> {
  const originPath = join(ctx.workDir, 'ceiling.origin')
  const out: Record<string, Ceiling> = {}
  for (const [cfg] of VS_RAW['ft-seq1m'] ?? []) {
    const c = FT_CONFIGS.find((x) => x.key === cfg)
    if (!c) continue
    copy(ctx.baseImage, originPath)
    syncAll()
    const q = Math.floor(ctx.args.size / 4 / MiB) * MiB
    out[cfg] = await seqFirstTouchCeiling({ workDir: ctx.workDir, originPath, offsetBytes: 2 * q, sizeBytes: q, snapshots: c.snaps, chunkBytes: c.chunk })
    log(`  I/O ceiling ft-seq1m ${cfg.slice(10)}: ${fmt(out[cfg].mibps, 0)} MiB/s (windows in flight × MiB: ${out[cfg].windows}×${out[cfg].windowMiB})`)
  }
  rmSync(originPath, { force: true })
  return out
}

const find = (round: Record<string, FioResult[]>, cfg: string, job: string) => round[cfg]?.find((r) => r.job === job && !r.error)

/**
 * Floors against the same run's no-snapshot figures (issue 15 for 4K chunks; issue 7's where
 * issue 15 sets none), then against the qcow2 overlay.
 */
const VS_RAW: Record<string, ReadonlyArray<readonly [string, number]>> = {
  'ft-rand4k': [['blocksnap 1 snap 4K', 0.7], ['blocksnap 4 snap 4K', 0.25], ['blocksnap 1 snap 64K', 0.5], ['blocksnap 4 snap 64K', 0.25]],
  'ft-seq1m': [['blocksnap 1 snap 4K', 0.5], ['blocksnap 4 snap 4K', 0.25], ['blocksnap 8 snap 4K', 0.12], ['blocksnap 1 snap 64K', 0.5], ['blocksnap 4 snap 64K', 0.25]],
}
const VS_QCOW2: Record<string, ReadonlyArray<readonly [string, number]>> = {
  'ft-rand4k': [['blocksnap 1 snap 4K', 1.2], ['blocksnap 1 snap 64K', 1.0]],
  'ft-seq1m': [['blocksnap 1 snap 4K', 1.0], ['blocksnap 1 snap 64K', 1.0]],
}

function floors(results: Results): FloorRow[] {
  const rows: FloorRow[] = []
  const firstTouch = rounds(results)
  for (const job of ['ft-rand4k', 'ft-seq1m']) {
    for (const [cfg, floor] of VS_RAW[job] ?? []) {
      const pairs = firstTouch.map((r): [number, number] => [metric(find(r, cfg, job), job), metric(find(r, 'blocksnap 0 snap', job), job)])
      rows.push({
        what: `First-touch ${job.slice(3)}: ${cfg.slice(10)} vs 0 snapshots`,
        floor: `≥ ${floor}`,
        ok: (x) => x >= floor,
        ratios: pairs.map(([a, b]) => a / b),
        raw: rawPairs(pairs, cfg.slice(10), '0 snap', unit(job)) + ceilingNote(results, job, cfg, pairs) + randCeilingNote(results, job, cfg, pairs),
      })
    }
    for (const [cfg, floor] of VS_QCOW2[job] ?? []) {
      const pairs = firstTouch.map((r): [number, number] => [metric(find(r, cfg, job), job), metric(find(r, 'qemu-nbd qcow2', job), job)])
      rows.push({
        what: `First-touch ${job.slice(3)}: ${cfg.slice(10)} vs qemu-nbd qcow2 overlay`,
        floor: `≥ ${floor}`,
        ok: (x) => x >= floor,
        ratios: pairs.map(([a, b]) => a / b),
        raw: rawPairs(pairs, 'blocksnap', 'qcow2', unit(job)) + randCeilingNote(results, job, cfg, pairs),
      })
    }
  }
  return rows
}

/** For a floor against 0 snapshots: the ratio that the job's own I/O allows at most (median of rounds). */
function ceilingNote(results: Results, job: string, cfg: string, pairs: Array<[number, number]>): string {
  const ceilings = ceilingRounds(results)
  if (job !== 'ft-seq1m' || ceilings.length !== pairs.length || ceilings.some((r) => !r[cfg])) return ''
  const ratios = ceilings.map((r, i) => (r[cfg]?.mibps ?? 0) / (pairs[i]?.[1] ?? 1))
  return `; I/O ceiling ${ceilings.map((r) => k(r[cfg]?.mibps ?? 0)).join(' / ')} MiB/s, ratio ≤ ${fmt(median(ratios), 2)}`
}

/**
 * For an ft-rand4k floor of the config the ceiling server bounds: its IOPS per round and the
 * ratio to the floor's baseline (no snapshot, or qcow2) it allows at most (median of rounds).
 */
function randCeilingNote(results: Results, job: string, cfg: string, pairs: Array<[number, number]>): string {
  const ceilings = randCeilingRounds(results)
  if (job !== 'ft-rand4k' || cfg !== RAND_CEILING_CONFIG || ceilings.length !== pairs.length) return ''
  const ratios = ceilings.map((r, i) => metric(r, job) / (pairs[i]?.[1] ?? 1))
  return `; I/O ceiling ${ceilings.map((r) => k(metric(r, job))).join(' / ')} IOPS, ratio ≤ ${fmt(median(ratios), 2)} [${ratios.map((x) => fmt(x, 2)).join(', ')}]`
}

function section(results: Results): string[] {
  const firstTouch = rounds(results)
  if (firstTouch.length === 0) return []
  const lines: string[] = []
  lines.push('## First touch vs rewrite on a fresh snapshot / overlay')
  lines.push('')
  lines.push('ft = first write to each block after the snapshot (random 4K QD32 over half the device, stopped after the runtime; 1M sequential QD8 over a quarter; 4K random with fsync every 32 writes over the last quarter); rw = the same blocks written again.')
  lines.push('')
  const jobs = ['ft-rand4k', 'rw-rand4k', 'ft-seq1m', 'rw-seq1m', 'ft-fsync4k']
  lines.push(`| Config | ${jobs.map((j) => `${j} (${unit(j)})`).join(' | ')} |`)
  lines.push(`| --- | ${jobs.map(() => '---').join(' | ')} |`)
  for (const cfg of Object.keys(firstTouch[0] ?? {})) {
    lines.push(`| ${cfg} | ${jobs.map((j) => firstTouch.map((r) => k(metric(find(r, cfg, j), j))).join(' / ')).join(' | ')} |`)
  }
  lines.push('')
  const randCeilings = randCeilingRounds(results)
  if (randCeilings.length > 0) {
    const got = firstTouch.map((r) => metric(find(r, RAND_CEILING_CONFIG, 'ft-rand4k'), 'ft-rand4k'))
    const raw = firstTouch.map((r) => metric(find(r, 'blocksnap 0 snap', 'ft-rand4k'), 'ft-rand4k'))
    const qcow2 = firstTouch.map((r) => metric(find(r, 'qemu-nbd qcow2', 'ft-rand4k'), 'ft-rand4k'))
    const ceil = randCeilings.map((r) => metric(r, 'ft-rand4k'))
    lines.push(
      '**I/O ceiling of ft-rand4k, one 4K snapshot** (bench/ceiling/rand4k-device.ts): an NBD server on the same NBD code and thread pool as blocksnap whose device does only the job\'s own I/O — per chunk written first, a blocking read of the old bytes from the origin, the write held; commit rounds back to back, each writing the gathered old bytes to consecutive COW chunks and the areas of the batch the previous round made durable, one COW flush, then that batch\'s writes on the origin — with a byte per chunk for bookkeeping. Its COW is a valid persistent COW (test/bench). Every engine must do at least this I/O; done here in the cheapest way measured (blocking reads and landings; with either on the thread pool it was slower), it bounds what an engine in this runtime can reach.',
    )
    lines.push('')
    lines.push('| ceiling (IOPS) | blocksnap 1 snap 4K (IOPS) | ceiling / 0 snap | ceiling / qcow2 | blocksnap / ceiling |')
    lines.push('| --- | --- | --- | --- | --- |')
    const per = (f: (c: number, i: number) => number) => ceil.map((c, i) => fmt(f(c, i), 2)).join(' / ')
    lines.push(`| ${ceil.map(k).join(' / ')} | ${got.map(k).join(' / ')} | ${per((c, i) => c / (raw[i] ?? 1))} | ${per((c, i) => c / (qcow2[i] ?? 1))} | ${per((c, i) => (got[i] ?? 0) / c)} |`)
    lines.push('')
  }
  const ceilings = ceilingRounds(results)
  if (ceilings.length > 0) {
    lines.push('**I/O ceiling of ft-seq1m** (bench/ceiling/seq1m.ts): the job\'s own I/O, in this process with no engine — old bytes read once and written to every COW, every COW flushed, its metadata areas written and flushed, then the new bytes written to the origin — in windows holding the engine\'s write-back budget, best of several window shapes. No engine can beat it; the no-snapshot figure it is divided by comes over NBD.')
    lines.push('')
    lines.push('| Config | ceiling (MiB/s) | ft-seq1m (MiB/s) | ceiling / 0 snap | ft-seq1m / ceiling |')
    lines.push('| --- | --- | --- | --- | --- |')
    for (const cfg of Object.keys(ceilings[0] ?? {})) {
      const ceil = ceilings.map((r) => r[cfg]?.mibps ?? 0)
      const got = firstTouch.map((r) => metric(find(r, cfg, 'ft-seq1m'), 'ft-seq1m'))
      const raw = firstTouch.map((r) => metric(find(r, 'blocksnap 0 snap', 'ft-seq1m'), 'ft-seq1m'))
      const shape = ceilings.map((r) => `${r[cfg]?.windows}×${r[cfg]?.windowMiB} MiB`).join(' / ')
      lines.push(`| ${cfg} | ${ceil.map(k).join(' / ')} (${shape}) | ${got.map(k).join(' / ')} | ${ceil.map((c, i) => fmt(c / (raw[i] ?? 1), 2)).join(' / ')} | ${ceil.map((c, i) => fmt((got[i] ?? 0) / c, 2)).join(' / ')} |`)
    }
    lines.push('')
  }
  return lines
}

export const firstTouchSuite: Suite = {
  name: 'firsttouch',
  usesPeers: true,
  initialResults: () => ({ firstTouch: [], firstTouchCeiling: [], firstTouchRandCeiling: [] }),
  async round(ctx, round) {
    const { jobs, randCeiling } = await firstTouchRound(ctx, round)
    rounds(ctx.results).push(jobs)
    randCeilingRounds(ctx.results).push(randCeiling)
    ceilingRounds(ctx.results).push(await ceilingRound(ctx))
  },
  floors,
  fioJobs: (results) => [...rounds(results).flatMap((r) => Object.values(r).flat()), ...randCeilingRounds(results)],
  section,
}
