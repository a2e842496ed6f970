/** Merge of changed chunks (offline, in-process) vs qemu-img commit of an overlay holding the same writes; then a live merge under reads. */
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import { Volume } from '../../src/volume/volume.js'
import type { BenchContext, Results } from '../lib/context.js'
import { copy, dropVolume, makeVolume, syncAll } from '../lib/files.js'
import { fio, type Job, JOBS } from '../lib/fio.js'
import { log } from '../lib/log.js'
import { ROOT } from '../lib/paths.js'
import { run, sleep, timed } from '../lib/proc.js'
import { startBlocksnap, startQemuOverlay, withServer } from '../lib/servers.js'
import type { FloorRow, Suite } from '../lib/suite.js'
import { KiB, MiB } from '../lib/units.js'
import { fmt, median } from '../report/format.js'

const mergeResults = (results: Results) => results.merge as Record<string, unknown>

/** Rounds of each offline merge (blocksnap 4K, blocksnap 64K and qemu-img commit, interleaved). */
const MERGE_ROUNDS = 3

interface MergeCase {
  readonly key: string
  readonly job: (size: number) => Job
  readonly bytes: number
}

interface MergeRun {
  readonly seconds: number
  readonly mibps: number
  /** Merge steps (blocksnap only). */
  readonly steps?: number
}

/** One snapshot, the changes written to the origin over NBD, then the merge offline in-process. */
async function blocksnapMerge(ctx: BenchContext, c: MergeCase, chunk: number): Promise<MergeRun> {
  const dir = await makeVolume(ctx, 1, chunk)
  await withServer(() => startBlocksnap(ctx, dir), (s) => fio(s, c.job(s.sizeBytes)))
  syncAll()
  const [seconds, steps] = await timed(async () => {
    const v = await Volume.open(dir)
    const m = await v.startMerge('s0')
    await m.done
    const n = m.stats.steps
    // the merged snapshot is dropped (manifest rewritten) just after 'complete'
    while (v.merge) await sleep(5)
    await v.close()
    return n
  })
  dropVolume(dir)
  return { seconds, steps, mibps: c.bytes / MiB / seconds }
}

/** The same client writes into a fresh qcow2 overlay, then qemu-img commit. */
async function qemuCommit(ctx: BenchContext, c: MergeCase): Promise<MergeRun & { overlayBytesOnDisk: number }> {
  const base = join(ctx.workDir, 'commit-base.img')
  const ov = join(ctx.workDir, 'commit.qcow2')
  copy(ctx.baseImage, base)
  await withServer(() => startQemuOverlay(ctx, base, ov), (s) => fio(s, c.job(s.sizeBytes)))
  const allocated = run('qemu-img', ['info', '--output=json', ov]).stdout
  syncAll()
  const [seconds] = await timed(async () => run('qemu-img', ['commit', '-q', '-f', 'qcow2', ov]))
  rmSync(base, { force: true })
  rmSync(ov, { force: true })
  return { seconds, mibps: c.bytes / MiB / seconds, overlayBytesOnDisk: (JSON.parse(allocated) as { 'actual-size': number })['actual-size'] }
}

async function mergeBench(ctx: BenchContext): Promise<void> {
  const { args } = ctx
  const T = args.runtime
  const results = mergeResults(ctx.results)
  const cases: MergeCase[] = [
    {
      key: 'sequential',
      bytes: Math.floor(args.size / 2),
      job: () => ({ name: 'change-seq1m', rw: 'write', bs: '1M', iodepth: 8, offset: 0, size: Math.floor(args.size / 2) }),
    },
    {
      key: 'random 4K',
      bytes: 32 * MiB,
      job: (size) => ({ name: 'change-rand4k', rw: 'randwrite', bs: '4k', iodepth: 32, size, ioSize: 32 * MiB }),
    },
  ]
  for (const c of cases) {
    log(`merge: ${c.key}, ${c.bytes / MiB} MiB changed, ${MERGE_ROUNDS} rounds`)
    // Each merge takes about half a second, so one sample is mostly noise: rounds interleave
    // the three, and the floors take the median of the per-round ratios.
    const rounds: Array<Record<string, MergeRun>> = []
    for (let round = 1; round <= MERGE_ROUNDS; round++) {
      const runs: Record<string, MergeRun> = {}
      for (const chunk of [4096, 65536]) runs[`blocksnap ${chunk / KiB}K`] = await blocksnapMerge(ctx, c, chunk)
      runs['qemu-img commit'] = await qemuCommit(ctx, c)
      for (const [config, r] of Object.entries(runs)) {
        log(`  round ${round} ${config}: ${r.seconds.toFixed(2)} s${r.steps === undefined ? '' : `, ${r.steps} steps`}, ${r.mibps.toFixed(1)} MiB/s`)
      }
      rounds.push(runs)
    }
    const entry: Record<string, unknown> = { changedBytes: c.bytes, rounds }
    for (const config of Object.keys(rounds[0] ?? {})) {
      const seconds = median(rounds.map((r) => (r[config] as MergeRun).seconds))
      entry[config] = { seconds, mibps: c.bytes / MiB / seconds }
    }
    results[c.key] = entry
  }
  // live merge with concurrent client reads, through the CLI as a user would run it
  log('merge: live, sequential changes, with concurrent 4K random reads on the origin')
  const dir = await makeVolume(ctx, 1, 4096)
  const first = cases[0] as (typeof cases)[number]
  await withServer(
    () => startBlocksnap(ctx, dir, 'blocksnap live merge'),
    async (s) => {
      await fio(s, first.job(s.sizeBytes))
      const readsAlone = await fio(s, { ...JOBS.randread4k(T), name: 'reads-before-merge', runtime: 3 })
      const reads = fio(s, { ...JOBS.randread4k(T), name: 'reads-during-merge', runtime: 3 * T })
      await sleep(500)
      const [seconds] = await timed(async () => run(join(ROOT, 'bin', 'blocksnap'), ['merge', `${dir}@s0`, '--wait']))
      const during = await reads
      results['live sequential with concurrent reads'] = {
        changedBytes: first.bytes,
        secondsIncludingCli: seconds,
        mibps: first.bytes / MiB / seconds,
        readIopsBefore: readsAlone.iops,
        readIopsDuringMergeWindow: during.iops,
      }
      log(`  live merge: ${seconds.toFixed(2)} s (including CLI start-up); reads ${readsAlone.iops} IOPS before, ${during.iops} IOPS over a window containing the merge`)
    },
  )
  dropVolume(dir)
}

/** Issue 15's merge floors (4K chunks); issue 7's 0.7 for the rest. */
const MERGE_FLOORS: Record<string, number> = { 'sequential blocksnap 4K': 0.9, 'random 4K blocksnap 4K': 1.0 }

function floors(results: Results): FloorRow[] {
  const rows: FloorRow[] = []
  const merge = mergeResults(results)
  for (const key of ['sequential', 'random 4K']) {
    const e = merge[key] as (Record<string, MergeRun> & { rounds?: Array<Record<string, MergeRun>>; changedBytes: number }) | undefined
    if (!e) continue
    const q = e['qemu-img commit']
    // Results from before the rounds (one run each) count as one round.
    const rounds = e.rounds ?? [e as Record<string, MergeRun>]
    for (const c of ['blocksnap 4K', 'blocksnap 64K']) {
      const b = e[c]
      if (!b || !q) continue
      const floor = MERGE_FLOORS[`${key} ${c}`] ?? 0.7
      rows.push({
        what: `Merge, ${key} changes (${e.changedBytes / MiB} MiB), ${c.slice(10)} chunks vs qemu-img commit`,
        floor: `≥ ${floor}`,
        ok: (x) => x >= floor,
        ratios: rounds.map((r) => (r[c] as MergeRun).mibps / (r['qemu-img commit'] as MergeRun).mibps),
        raw: `${fmt(b.seconds)} s (${fmt(b.mibps, 0)} MiB/s) vs ${fmt(q.seconds)} s (${fmt(q.mibps, 0)} MiB/s), medians of ${rounds.length}`,
      })
    }
  }
  return rows
}

function section(results: Results): string[] {
  const merge = mergeResults(results)
  if (Object.keys(merge).length === 0) return []
  return ['## Merge', '', '```json', JSON.stringify(merge, null, 1), '```', '']
}

export const mergeSuite: Suite = {
  name: 'merge',
  usesPeers: true,
  initialResults: () => ({ merge: {} }),
  run: mergeBench,
  floors,
  section,
}
