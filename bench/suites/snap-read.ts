/** Snapshot-export reads vs origin reads, one snapshot (4K chunks) with 25% of the chunks saved. */
import type { BenchContext, Results } from '../lib/context.js'
import { dropVolume, makeVolume } from '../lib/files.js'
import { type FioResult, fio, JOBS, metric, unit } from '../lib/fio.js'
import { log } from '../lib/log.js'
import { exportOf, startBlocksnap, withServer } from '../lib/servers.js'
import type { FloorRow, Suite } from '../lib/suite.js'
import { rawPairs } from '../report/format.js'

const rounds = (results: Results) => results.snapRead as FioResult[][]

async function snapReadRounds(ctx: BenchContext): Promise<void> {
  log('snapshot-export reads vs origin reads')
  const dir = await makeVolume(ctx, 1, 4096)
  const name = dir.split('/').pop() as string
  await withServer(
    () => startBlocksnap(ctx, dir, 'blocksnap 1 snap 4K (25% saved)'),
    async (origin) => {
      await fio(origin, { name: 'prefill-25pct', rw: 'randwrite', bs: '4k', iodepth: 32, ioSize: origin.sizeBytes / 4 })
      const snap = exportOf(origin, `${name}@s0 export`, `${name}@s0`)
      for (let r = 1; r <= ctx.args.rounds; r++) {
        const out: FioResult[] = []
        for (const job of [JOBS.randread4k(ctx.args.runtime), JOBS.seqread1m(ctx.args.runtime)]) {
          out.push(await fio({ ...origin, label: 'origin export' }, job))
          out.push(await fio(snap, job))
        }
        rounds(ctx.results).push(out)
      }
    },
  )
  dropVolume(dir)
}

function floors(results: Results): FloorRow[] {
  const rows: FloorRow[] = []
  for (const job of ['randread4k', 'seqread1m']) {
    const pairs = rounds(results).map((round): [number, number] => [
      metric(round.find((r) => r.job === job && r.server.endsWith('@s0 export')), job),
      metric(round.find((r) => r.job === job && r.server === 'origin export'), job),
    ])
    rows.push({
      what: `Snapshot-export ${job} vs origin ${job} (25% of chunks in the COW)`,
      floor: '≥ 0.9',
      ok: (x) => x >= 0.9,
      ratios: pairs.map(([a, b]) => a / b),
      raw: rawPairs(pairs, 'snapshot', 'origin', unit(job)),
    })
  }
  return rows
}

export const snapReadSuite: Suite = {
  name: 'snapread',
  usesPeers: true,
  initialResults: () => ({ snapRead: [] }),
  run: snapReadRounds,
  floors,
  fioJobs: (results) => rounds(results).flat(),
}
