/**
 * CLI start-up (issue 16): `blocksnap --version` and `blocksnap list VOL` against `node -e 0`,
 * measured by bench/startup.ts, as two floors rows.
 */
import type { Results } from '../lib/context.js'
import { log } from '../lib/log.js'
import type { FloorRow, Suite } from '../lib/suite.js'
import { fmt } from '../report/format.js'
import { type StartupResult, startupBench } from '../startup.js'

function floors(results: Results): FloorRow[] {
  const st = results.startup as StartupResult | null
  if (!st) return []
  const ms = (x: number) => `${fmt(x * 1000, 0)} ms`
  return (
    [
      ['Start-up: `blocksnap --version` vs `node -e 0`', 3, st.versionRatios, st.versionSeconds],
      ['Start-up: `blocksnap list VOL` vs `node -e 0`', 4, st.listRatios, st.listSeconds],
    ] as const
  ).map(([what, floor, ratios, seconds]) => ({
    what: `${what} (issue 16; ${st.rounds} rounds)`,
    floor: `≤ ${floor}`,
    ok: (x: number) => x <= floor,
    ratios: [...ratios],
    raw: `${ms(seconds)} vs ${ms(st.nodeSeconds)} (medians)`,
  }))
}

export const startupSuite: Suite = {
  name: 'startup',
  usesPeers: false,
  initialResults: () => ({ startup: null }),
  async run(ctx) {
    log('start-up: node -e 0, blocksnap --version, blocksnap list VOL, in turn')
    ctx.results.startup = startupBench()
  },
  floors,
}
