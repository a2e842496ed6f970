/**
 * A volume on Ceph RBD (origin and COW are RBD images of a one-node memstore cluster started by
 * scripts/ceph-cluster.sh) against qemu-nbd serving an RBD image directly: first-touch 4K random
 * writes, 1M sequential writes, then 1M sequential reads of what was written. Every config gets
 * fresh images, so each pays RBD's first write to a new object; blocksnap adds its private
 * qemu-nbd gateway hop and, with a snapshot, the copy-out into the COW image.
 */
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import type { BenchContext, Results } from '../lib/context.js'
import { type FioResult, fio, metric, unit } from '../lib/fio.js'
import { log } from '../lib/log.js'
import { ROOT } from '../lib/paths.js'
import { run } from '../lib/proc.js'
import { type Server, startBlocksnap, startQemuNbdRaw, withServer } from '../lib/servers.js'
import type { Suite } from '../lib/suite.js'
import { MiB } from '../lib/units.js'
import { fmt, k, median } from '../report/format.js'

const rounds = (results: Results) => results.rbd as Array<Record<string, FioResult[]>>

const SIZE = 256 * MiB
const COW_SIZE = SIZE + 16 * MiB
const POOL = 'rbd'
const DIRECT = 'qemu-nbd rbd (direct)'
const CONFIGS = [DIRECT, 'blocksnap rbd 0 snap', 'blocksnap rbd 1 snap 4K'] as const
const JOB_NAMES = ['ft-rand4k', 'ft-seq1m', 'read-seq1m'] as const

async function jobs(s: Server, runtimeSeconds: number): Promise<FioResult[]> {
  const half = SIZE / 2
  return [
    await fio(s, { name: 'ft-rand4k', rw: 'randwrite', bs: '4k', iodepth: 32, offset: 0, size: half, runtime: runtimeSeconds }),
    await fio(s, { name: 'ft-seq1m', rw: 'write', bs: '1M', iodepth: 8, offset: half, size: half / 2, runtime: 4 * runtimeSeconds }),
    await fio(s, { name: 'read-seq1m', rw: 'read', bs: '1M', iodepth: 8, offset: half, size: half / 2, runtime: runtimeSeconds }),
  ]
}

class Cluster {
  readonly dir: string
  readonly conf: string
  private seq = 0
  constructor(dir: string) {
    this.dir = dir
    const out = run('bash', [join(ROOT, 'scripts', 'ceph-cluster.sh'), 'start', dir, POOL]).stdout
    const conf = /^CEPH_CONF=(.*)$/m.exec(out)?.[1]
    if (conf === undefined) throw new Error(`ceph-cluster.sh printed no CEPH_CONF: ${out}`)
    this.conf = conf
  }
  image(prefix: string, sizeBytes: number): string {
    const name = `${prefix}${++this.seq}`
    run('rbd', ['--conf', this.conf, 'create', '--size', `${sizeBytes / MiB}M`, `${POOL}/${name}`])
    return name
  }
  remove(name: string): void {
    run('rbd', ['--conf', this.conf, 'rm', '--no-progress', `${POOL}/${name}`])
  }
  address(name: string): string {
    return `rbd:${POOL}/${name}?conf=${this.conf}`
  }
  stop(): void {
    run('bash', [join(ROOT, 'scripts', 'ceph-cluster.sh'), 'stop', this.dir], { allowFail: true })
  }
}

async function rbdRound(ctx: BenchContext, cluster: Cluster, round: number): Promise<Record<string, FioResult[]>> {
  log(`rbd: round ${round}`)
  const T = ctx.args.runtime
  const blocksnap = join(ROOT, 'bin', 'blocksnap')
  const out: Record<string, FioResult[]> = {}
  const direct = cluster.image('direct', SIZE)
  out[DIRECT] = await withServer(() => startQemuNbdRaw(ctx, DIRECT, `rbd:${POOL}/${direct}:conf=${cluster.conf}`), (s) => jobs(s, T))
  cluster.remove(direct)
  for (const snaps of [0, 1]) {
    const key = CONFIGS[1 + snaps]!
    const origin = cluster.image('origin', SIZE)
    const dir = join(ctx.workDir, `rbdvol${round}-${snaps}`)
    run(blocksnap, ['create', dir, '--origin', cluster.address(origin)])
    const cow = snaps === 1 ? cluster.image('cow', COW_SIZE) : null
    if (cow !== null) run(blocksnap, ['snapshot', `${dir}@s`, '--cow', cluster.address(cow)])
    out[key] = await withServer(() => startBlocksnap(ctx, dir, key), (s) => jobs(s, T))
    run('rm', ['-rf', dir])
    cluster.remove(origin)
    if (cow !== null) cluster.remove(cow)
  }
  return out
}

const find = (round: Record<string, FioResult[]>, cfg: string, job: string) => round[cfg]?.find((r) => r.job === job && !r.error)

function section(results: Results): string[] {
  const all = rounds(results)
  if (all.length === 0) return []
  const lines: string[] = []
  lines.push('## Volumes on Ceph RBD')
  lines.push('')
  lines.push(
    `One-node Ceph (memstore OSD, loopback), fresh ${SIZE / MiB} MiB images per config. ft-rand4k: first writes, random 4K QD32 over half the image; ft-seq1m: first writes, 1M sequential QD8 over a quarter; read-seq1m: reading that quarter back. blocksnap serves a volume whose origin (and COW) are RBD images through its private qemu-nbd gateways; qemu-nbd serves an RBD image directly. Figures per round.`,
  )
  lines.push('')
  lines.push(`| Config | ${JOB_NAMES.map((j) => `${j} (${unit(j)})`).join(' | ')} |`)
  lines.push(`| --- | ${JOB_NAMES.map(() => '---').join(' | ')} |`)
  for (const cfg of CONFIGS) lines.push(`| ${cfg} | ${JOB_NAMES.map((j) => all.map((r) => k(metric(find(r, cfg, j), j))).join(' / ')).join(' | ')} |`)
  lines.push('')
  lines.push('| Ratio (median of rounds) | ' + JOB_NAMES.join(' | ') + ' |')
  lines.push(`| --- | ${JOB_NAMES.map(() => '---').join(' | ')} |`)
  for (const cfg of CONFIGS.slice(1)) {
    const ratios = JOB_NAMES.map((j) => median(all.map((r) => metric(find(r, cfg, j), j) / metric(find(r, DIRECT, j), j))))
    lines.push(`| ${cfg} / ${DIRECT} | ${ratios.map((x) => fmt(x)).join(' | ')} |`)
  }
  lines.push('')
  return lines
}

export const rbdSuite: Suite = {
  name: 'rbd',
  usesPeers: true,
  initialResults: () => ({ rbd: [] }),
  async run(ctx) {
    const dir = join(ctx.workDir, 'ceph')
    mkdirSync(dir, { recursive: true })
    const savedStateDir = process.env.BLOCKSNAP_STATE_DIR
    process.env.BLOCKSNAP_STATE_DIR = join(ctx.workDir, 'rbd-state') // the origin registry of these volumes
    const cluster = new Cluster(join(dir, 'cluster'))
    try {
      for (let round = 1; round <= ctx.args.rounds; round++) rounds(ctx.results).push(await rbdRound(ctx, cluster, round))
    } finally {
      cluster.stop()
      if (savedStateDir === undefined) delete process.env.BLOCKSNAP_STATE_DIR
      else process.env.BLOCKSNAP_STATE_DIR = savedStateDir
    }
    for (const line of section(ctx.results)) log(line)
  },
  fioJobs: (results) => rounds(results).flatMap((r) => Object.values(r).flat()),
  section,
}
