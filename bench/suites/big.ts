/** A sparse 16 TiB origin: create, snapshot, serve, a few I/Os at random over the whole range. */
import { mkdtempSync, rmSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { Volume } from '../../src/volume/volume.js'
import type { BenchContext, Results } from '../lib/context.js'
import { type FioResult, fio } from '../lib/fio.js'
import { log } from '../lib/log.js'
import { run, timed } from '../lib/proc.js'
import { exportOf, startBlocksnap, withServer } from '../lib/servers.js'
import type { Suite } from '../lib/suite.js'
import { MiB, TiB } from '../lib/units.js'
import { fmt, k } from '../report/format.js'

async function bigBench(ctx: BenchContext): Promise<Record<string, unknown>> {
  const WORK = ctx.workDir
  const T = ctx.args.runtime
  const want = 16 * TiB
  const tried: string[] = []
  let dir = ''
  let size = want
  let createSeconds = 0
  for (const where of [WORK, '/dev/shm']) {
    const d = join(where === WORK ? WORK : mkdtempSync(join(where, 'blocksnap-bench-')), 'big')
    try {
      ;[createSeconds] = await timed(() => Volume.create(d, { sizeBytes: size }))
      dir = d
      break
    } catch (err) {
      tried.push(`${where}: ${(err as Error).message}`)
      if (where !== WORK) rmSync(dirname(d), { recursive: true, force: true })
    }
  }
  if (!dir) {
    size = want - 4096
    dir = join(WORK, 'big')
    ;[createSeconds] = await timed(() => Volume.create(dir, { sizeBytes: size }))
  }
  log(`16 TiB sparse origin at ${dir} (${size} bytes)`)
  const [snapSeconds] = await timed(async () => {
    const v = await Volume.open(dir)
    await v.createSnapshot('s0', { chunkSizeBytes: 4096 })
    await v.close()
  })
  const t = performance.now()
  const out: Record<string, unknown> = { sizeBytes: size, dir, tried, createSeconds, snapshotSeconds: snapSeconds }
  await withServer(
    () => startBlocksnap(ctx, dir, 'blocksnap 16 TiB'),
    async (s) => {
      out.serveReadySeconds = (performance.now() - t) / 1000
      out.nbdinfoSize = s.sizeBytes
      const sparse = ['--norandommap', '--randrepeat=0']
      out.randwrite = await fio(s, { name: 'big-ft-randwrite4k', rw: 'randwrite', bs: '4k', iodepth: 32, ioSize: 32 * MiB, runtime: 2 * T, extra: sparse })
      out.randread = await fio(s, { name: 'big-randread4k', rw: 'randread', bs: '4k', iodepth: 32, ioSize: 32 * MiB, runtime: 2 * T, extra: sparse })
      const name = dir.split('/').pop() as string
      const snap = exportOf(s, 'blocksnap 16 TiB @s0', `${name}@s0`)
      out.snapRandread = await fio(snap, { name: 'big-snap-randread4k', rw: 'randread', bs: '4k', iodepth: 32, ioSize: 32 * MiB, runtime: 2 * T, extra: sparse })
    },
  )
  out.diskBytesUsed = Number(run('du', ['-sB1', dir]).stdout.split('\t')[0])
  rmSync(dir.startsWith('/dev/shm') ? dirname(dir) : dir, { recursive: true, force: true })
  return out
}

function section(results: Results): string[] {
  if (!results.big) return []
  const b = results.big as Record<string, unknown> & { randwrite?: FioResult; randread?: FioResult; snapRandread?: FioResult }
  return [
    '## 16 TiB sparse origin',
    '',
    `Size ${b.sizeBytes} bytes at ${b.dir} (${(b.tried as string[]).length ? `tried first: ${(b.tried as string[]).join('; ')}` : 'first try'}); create ${fmt(b.createSeconds as number)} s, ` +
      `snapshot ${fmt(b.snapshotSeconds as number)} s, serve ready ${fmt(b.serveReadySeconds as number)} s; random 4K QD32 over the whole range: ` +
      `first-touch writes ${k(b.randwrite?.iops ?? NaN)} IOPS, origin reads ${k(b.randread?.iops ?? NaN)} IOPS, snapshot reads ${k(b.snapRandread?.iops ?? NaN)} IOPS; disk used ${fmt(((b.diskBytesUsed as number) || 0) / MiB, 1)} MiB.`,
    '',
  ]
}

export const bigSuite: Suite = {
  name: 'big',
  usesPeers: true,
  initialResults: () => ({ big: null }),
  async run(ctx) {
    ctx.results.big = await bigBench(ctx)
  },
  section,
}
