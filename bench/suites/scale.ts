/** Scale: exception-table memory (bench/exception-table.ts in its own process) and COW open speed. */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import type { BenchContext, Results } from '../lib/context.js'
import { log } from '../lib/log.js'
import { BENCH_DIR } from '../lib/paths.js'
import { run } from '../lib/proc.js'
import type { FloorRow, Suite } from '../lib/suite.js'
import { fmt } from '../report/format.js'
import { openBench } from './open-cow.js'

interface TableResults {
  results: Array<{ case: string; n: number; bytesPerException: number; insertsPerSec: number; lookupHitsPerSec: number }>
}

async function exceptionTableBench(ctx: BenchContext): Promise<TableResults> {
  log(`exception table: bench/exception-table.ts --max ${ctx.args.max}`)
  const r = run(process.execPath, ['--import', 'tsx', join(BENCH_DIR, 'exception-table.ts'), '--max', String(ctx.args.max)])
  process.stderr.write(r.stdout)
  return JSON.parse(readFileSync(join(BENCH_DIR, 'results-exception-table.json'), 'utf8')) as TableResults
}

function floors(results: Results): FloorRow[] {
  const rows: FloorRow[] = []
  const et = results.exceptionTable as TableResults | null
  if (et) {
    const nMax = Math.max(...et.results.map((r) => r.n))
    for (const r of et.results.filter((x) => x.n === nMax && !x.case.startsWith('sequential'))) {
      rows.push({
        what: `Exception table memory, ${r.case}, N = ${r.n.toExponential(0)}${nMax < 1e8 ? ' (1e8: run with --full)' : ''}`,
        floor: '≤ 16 B',
        ok: (x) => x <= 16,
        ratios: [r.bytesPerException],
        raw: `${fmt(r.bytesPerException)} bytes/exception`,
      })
    }
  }
  if (results.open) {
    const o = results.open as Record<string, unknown> & { exceptions: number }
    for (const key of ['sparse random', 'dense random']) {
      const c = o[key] as { exceptionsPerSecond: number; secondsPerRun: number[]; originChunksBits: number } | undefined
      if (!c) continue
      rows.push({
        what: `Open a persistent COW with ${o.exceptions.toExponential(0)} exceptions, ${key} origin chunks (over 2^${c.originChunksBits})`,
        floor: '≥ 2 M/s',
        ok: (x) => x >= 2,
        ratios: [c.exceptionsPerSecond / 1e6],
        raw: `${c.secondsPerRun.map((s) => fmt(s)).join(' / ')} s → ${fmt(c.exceptionsPerSecond / 1e6)} M exceptions/s`,
      })
    }
  }
  return rows
}

export const scaleSuite: Suite = {
  name: 'scale',
  usesPeers: false,
  initialResults: () => ({ exceptionTable: null, open: null }),
  async run(ctx) {
    ctx.results.exceptionTable = await exceptionTableBench(ctx)
    ctx.results.open = await openBench(ctx)
  },
  floors,
}
