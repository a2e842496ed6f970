/** The same five fio jobs on every server: fio on the file, nbdkit memory/file/cow, blocksnap with no snapshot, qemu-nbd qcow2. */
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import type { BenchContext, Results } from '../lib/context.js'
import { copy, dropVolume, makeVolume, syncAll } from '../lib/files.js'
import { type FioResult, fio, JOBS, metric, unit } from '../lib/fio.js'
import { log } from '../lib/log.js'
import { type Server, startBlocksnap, startNbdkitCow, startNbdkitFile, startNbdkitMemory, startQemuOverlay, withServer } from '../lib/servers.js'
import type { FloorRow, Suite } from '../lib/suite.js'
import { fmt, k, rawPairs } from '../report/format.js'

const rounds = (results: Results) => results.standard as FioResult[][]

const standardJobs = (runtimeSeconds: number) => [
  JOBS.randread4k(runtimeSeconds),
  JOBS.randwrite4k(runtimeSeconds),
  JOBS.seqread1m(runtimeSeconds),
  JOBS.seqwrite1m(runtimeSeconds),
  JOBS.fsync4k(runtimeSeconds),
]

const find = (round: FioResult[], server: string, job: string) => round.find((r) => r.server === server && r.job === job && !r.error)

async function standardRound(ctx: BenchContext, round: number): Promise<FioResult[]> {
  log(`standard jobs, round ${round}`)
  const { args, workDir, baseImage } = ctx
  const out: FioResult[] = []
  const runAll = async (s: Server) => {
    for (const job of standardJobs(args.runtime)) out.push(await fio(s, job))
  }
  // the machine's limit: fio straight on the file (page cache), no NBD
  const local = join(workDir, 'local.img')
  copy(baseImage, local)
  syncAll()
  for (const job of standardJobs(args.runtime)) out.push(await fio({ label: 'local file (io_uring)', uri: null, pid: 0, sizeBytes: args.size, file: local }, job))
  rmSync(local)
  await withServer(() => startNbdkitMemory(ctx, args.size), runAll)
  const file = join(workDir, 'file.img')
  copy(baseImage, file)
  syncAll()
  await withServer(() => startNbdkitFile(ctx, file), runAll)
  rmSync(file)
  const dir = await makeVolume(ctx, 0, 4096)
  await withServer(() => startBlocksnap(ctx, dir, 'blocksnap 0 snap'), runAll)
  dropVolume(dir)
  await withServer(() => startNbdkitCow(ctx, baseImage), runAll)
  await withServer(() => startQemuOverlay(ctx, baseImage, join(workDir, 'std.qcow2')), runAll)
  rmSync(join(workDir, 'std.qcow2'), { force: true })
  return out
}

function floors(results: Results): FloorRow[] {
  const rows: FloorRow[] = []
  for (const [job, floor] of [['randread4k', 0.9], ['randwrite4k', 0.7], ['seqread1m', 0.9], ['seqwrite1m', 0.9]] as const) {
    const pairs = rounds(results).map((r): [number, number] => [metric(find(r, 'blocksnap 0 snap', job), job), metric(find(r, 'nbdkit file', job), job)])
    rows.push({
      what: `No snapshot: ${job} vs nbdkit file`,
      floor: `≥ ${floor}`,
      ok: (x) => x >= floor,
      ratios: pairs.map(([a, b]) => a / b),
      raw: rawPairs(pairs, 'blocksnap', 'nbdkit', unit(job)),
    })
  }
  return rows
}

function section(results: Results): string[] {
  const standard = rounds(results)
  if (standard.length === 0) return []
  const lines: string[] = []
  lines.push('## Same jobs on every server (4K QD32, 1M QD8, fsync every 32 writes)')
  lines.push('')
  const servers = [...new Set(standard.flat().map((r) => r.server))]
  const jobs = [...new Set(standard.flat().map((r) => r.job))]
  lines.push(`| Server | ${jobs.map((j) => `${j} (${unit(j)})`).join(' | ')} | other cores |`)
  lines.push(`| --- | ${jobs.map(() => '---').join(' | ')} | --- |`)
  for (const s of servers) {
    const cells = jobs.map((j) => standard.map((r) => k(metric(find(r, s, j), j))).join(' / '))
    const other = Math.max(0, ...standard.flat().filter((r) => r.server === s).map((r) => r.foreignCores))
    lines.push(`| ${s} | ${cells.join(' | ')} | ≤ ${fmt(other)} |`)
  }
  lines.push('')
  lines.push('"local file (io_uring)" is fio on the file itself with no NBD at all: the machine\'s limit for these jobs. nbdkit memory is the NBD protocol ceiling.')
  lines.push('')
  return lines
}

export const standardSuite: Suite = {
  name: 'standard',
  usesPeers: true,
  initialResults: () => ({ standard: [] }),
  async round(ctx, round) {
    rounds(ctx.results).push(await standardRound(ctx, round))
  },
  floors,
  fioJobs: (results) => rounds(results).flat(),
  section,
}
