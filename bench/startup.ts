/**
 * Start-up cost of the installed CLI (issue 16): `blocksnap --version` and `blocksnap list VOL`
 * against `node -e 0`, as ratios. The three commands run in turn, round after round, so a load
 * spike on the machine lands on both sides of most ratios; each ratio is taken inside one round
 * and the median is reported. The CLI runs as npm's bin shim runs it: node on dist/cli/bin.cjs.
 *
 *   npx tsx bench/startup.ts [--rounds 21]      (npm run bench runs it as the 'startup' suite)
 */
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { median } from './report/format.js'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const BIN = join(ROOT, 'dist', 'cli', 'bin.cjs')

export interface StartupResult {
  readonly rounds: number
  /** Median wall seconds of each command. */
  readonly nodeSeconds: number
  readonly versionSeconds: number
  readonly listSeconds: number
  /** Per-round ratios against `node -e 0`, in round order. */
  readonly versionRatios: number[]
  readonly listRatios: number[]
}

/** Wall seconds of one run of `node ...argv`, which must succeed. */
function timeNode(argv: readonly string[]): number {
  const t = performance.now()
  const r = spawnSync(process.execPath, argv, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, BLOCKSNAP_LOG_LEVEL: 'warn' } })
  const seconds = (performance.now() - t) / 1000
  if (r.status !== 0) throw new Error(`node ${argv.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr.toString()}`)
  return seconds
}

export function startupBench(rounds = 21): StartupResult {
  if (!existsSync(BIN)) throw new Error(`${BIN} is missing: run npm run build`)
  const dir = mkdtempSync(join(tmpdir(), 'blocksnap-startup-'))
  try {
    // A volume with one snapshot holding a few exceptions, so `list` opens a real COW.
    const vol = join(dir, 'vol')
    timeNode([BIN, 'create', vol, '--size', '64M'])
    timeNode([BIN, 'snapshot', `${vol}@s`])
    const data = Buffer.alloc(256 * 1024, 1)
    const w = spawnSync(process.execPath, [BIN, 'write', vol, '--offset', '0'], { input: data })
    if (w.status !== 0) throw new Error(`write failed: ${w.stderr.toString()}`)
    const commands = { node: ['-e', '0'], version: [BIN, '--version'], list: [BIN, 'list', vol] }
    for (const argv of Object.values(commands)) timeNode(argv) // warm the page cache
    const times = { node: [] as number[], version: [] as number[], list: [] as number[] }
    for (let r = 0; r < rounds; r++) {
      for (const key of ['node', 'version', 'list'] as const) times[key].push(timeNode(commands[key]))
    }
    return {
      rounds,
      nodeSeconds: median(times.node),
      versionSeconds: median(times.version),
      listSeconds: median(times.list),
      versionRatios: times.version.map((t, i) => t / (times.node[i] as number)),
      listRatios: times.list.map((t, i) => t / (times.node[i] as number)),
    }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const k = process.argv.indexOf('--rounds')
  const r = startupBench(k >= 0 ? Number(process.argv[k + 1]) : 21)
  const ms = (s: number) => `${(s * 1000).toFixed(0)} ms`
  console.log(`node -e 0: ${ms(r.nodeSeconds)}; blocksnap --version: ${ms(r.versionSeconds)}; blocksnap list VOL: ${ms(r.listSeconds)} (medians of ${r.rounds} rounds)`)
  console.log(`ratios to node -e 0 (median of per-round ratios): --version ${median(r.versionRatios).toFixed(2)} (floor 3), list ${median(r.listRatios).toFixed(2)} (floor 4)`)
}
