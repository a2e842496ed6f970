/** First-touch then rewrite on a fresh snapshot (0–8 snapshots, 4K and 64K chunks) or overlay (qcow2, nbdkit cow). */
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import type { BenchContext, Results } from '../lib/context.js'
import { copy, dropVolume, makeVolume, syncAll } from '../lib/files.js'
import { type FioResult, fio, metric, unit } from '../lib/fio.js'
import { log } from '../lib/log.js'
import { type Server, startBlocksnap, startNbdkitCow, startQemuOverlay, withServer } from '../lib/servers.js'
import type { FloorRow, Suite } from '../lib/suite.js'
import { MiB } from '../lib/units.js'
import { fmt, k, median, rawPairs } from '../report/format.js'
import { type Ceiling, seqFirstTouchCeiling } from './first-touch-ceiling.js'

/** Per round: config -> its jobs. */
const rounds = (results: Results) => results.firstTouch as Array<Record<string, FioResult[]>>
/** Per round: config -> the I/O ceiling of its ft-seq1m job (first-touch-ceiling.ts). */
const ceilingRounds = (results: Results) => results.firstTouchCeiling as Array<Record<string, Ceiling>>

/** First-touch then rewrite, on a fresh snapshot (or overlay): random 4K, sequential 1M, fsync-heavy. */
async function firstTouchJobs(s: Server, runtimeSeconds: number): Promise<FioResult[]> {
  const T = runtimeSeconds
  const q = Math.floor(s.sizeBytes / 4 / MiB) * MiB
  const out: FioResult[] = []
  const ft = await fio(s, { name: 'ft-rand4k', rw: 'randwrite', bs: '4k', iodepth: 32, offset: 0, size: 2 * q, runtime: T })
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

async function firstTouchRound(ctx: BenchContext, round: number): Promise<Record<string, FioResult[]>> {
  log(`first-touch vs rewrite, round ${round}`)
  const jobs = (s: Server) => firstTouchJobs(s, ctx.args.runtime)
  const out: Record<string, FioResult[]> = {}
  for (const c of FT_CONFIGS) {
    const dir = await makeVolume(ctx, c.snaps, c.chunk)
    out[c.key] = await withServer(() => startBlocksnap(ctx, dir, c.key), jobs)
    dropVolume(dir)
  }
  out['qemu-nbd qcow2'] = await withServer(() => startQemuOverlay(ctx, ctx.baseImage, join(ctx.workDir, 'ft.qcow2')), jobs)
  rmSync(join(ctx.workDir, 'ft.qcow2'), { force: true })
  out['nbdkit cow'] = await withServer(() => startNbdkitCow(ctx, ctx.baseImage), jobs)
  return out
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
        raw: rawPairs(pairs, cfg.slice(10), '0 snap', unit(job)) + ceilingNote(results, job, cfg, pairs),
      })
    }
    for (const [cfg, floor] of VS_QCOW2[job] ?? []) {
      const pairs = firstTouch.map((r): [number, number] => [metric(find(r, cfg, job), job), metric(find(r, 'qemu-nbd qcow2', job), job)])
      rows.push({
        what: `First-touch ${job.slice(3)}: ${cfg.slice(10)} vs qemu-nbd qcow2 overlay`,
        floor: `≥ ${floor}`,
        ok: (x) => x >= floor,
        ratios: pairs.map(([a, b]) => a / b),
        raw: rawPairs(pairs, 'blocksnap', 'qcow2', unit(job)),
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
  const ceilings = ceilingRounds(results)
  if (ceilings.length > 0) {
    lines.push('**I/O ceiling of ft-seq1m** (first-touch-ceiling.ts): the job\'s own I/O, in this process with no engine — old bytes read once and written to every COW, every COW flushed, its metadata areas written and flushed, then the new bytes written to the origin — in windows holding the engine\'s write-back budget, best of several window shapes. No engine can beat it; the no-snapshot figure it is divided by comes over NBD.')
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
  initialResults: () => ({ firstTouch: [], firstTouchCeiling: [] }),
  async round(ctx, round) {
    rounds(ctx.results).push(await firstTouchRound(ctx, round))
    ceilingRounds(ctx.results).push(await ceilingRound(ctx))
  },
  floors,
  fioJobs: (results) => rounds(results).flatMap((r) => Object.values(r).flat()),
  section,
}
