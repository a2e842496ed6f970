/**
 * npm run torture: power cuts, fuzzed COW images and fuzzed NBD client streams against the
 * engine, the store and the server. Not part of npm test; CI runs `--short`.
 *
 *   npm run torture                         full campaign (10,000 / 100,000 / 100,000)
 *   npm run torture -- --short              1/20 of it (CI)
 *   npm run torture -- --power-cuts N --cow-images N --nbd-streams N --seed S --time-limit 10m
 *   npm run torture -- --seed S --replay cow-images:123    one case, exactly as in the run
 *
 * Every failure prints the seed and the case id to replay. Exit status: 0 when every case
 * passed, 1 on any failure, 2 on a usage error.
 */
import { cowCampaign } from './cow-fuzz.js'
import { type Campaign, type Failure, catchCrashes, describe } from './harness.js'
import { nbdCampaign } from './nbd-fuzz.js'
import { powerCutCampaign } from './power-cuts.js'

const FULL = { 'power-cuts': 10_000, 'cow-images': 100_000, 'nbd-streams': 100_000 }
const CAMPAIGNS: Campaign[] = [powerCutCampaign, cowCampaign, nbdCampaign]

interface Settings {
  counts: Record<string, number>
  seed: number
  timeLimitMs: number
  deadlineMs: number
  replay: string | null
}

function usage(message: string): never {
  process.stderr.write(`torture: ${message}\nusage: tsx torture/run.ts [--short] [--power-cuts N] [--cow-images N] [--nbd-streams N] [--seed S] [--time-limit 30s|10m] [--deadline-ms N] [--replay CAMPAIGN:CASE]\n`)
  process.exit(2)
}

function parseDuration(text: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(text)
  if (!m) usage(`bad duration ${text}`)
  return Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h']
}

function parseCount(text: string | undefined, flag: string): number {
  const n = Number(text)
  if (!Number.isSafeInteger(n) || n < 0) usage(`${flag} needs a count, not ${text}`)
  return n
}

function parseArgs(argv: string[]): Settings {
  const env = process.env
  const settings: Settings = {
    counts: { ...FULL },
    seed: env.TORTURE_SEED ? parseCount(env.TORTURE_SEED, 'TORTURE_SEED') : Math.floor(Math.random() * 2 ** 31),
    timeLimitMs: env.TORTURE_TIME_LIMIT ? parseDuration(env.TORTURE_TIME_LIMIT) : Infinity,
    deadlineMs: 60_000,
    replay: null,
  }
  let short = env.TORTURE_SHORT === '1'
  const explicit: Record<string, number> = {}
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i] as string
    const value = () => {
      const v = argv[++i]
      if (v === undefined) usage(`${flag} needs a value`)
      return v
    }
    switch (flag) {
      case '--short':
        short = true
        break
      case '--power-cuts':
      case '--cow-images':
      case '--nbd-streams':
        explicit[flag.slice(2)] = parseCount(value(), flag)
        break
      case '--seed':
        settings.seed = parseCount(value(), flag)
        break
      case '--time-limit':
        settings.timeLimitMs = parseDuration(value())
        break
      case '--deadline-ms':
        settings.deadlineMs = parseCount(value(), flag)
        break
      case '--replay':
        settings.replay = value()
        break
      default:
        usage(`unknown argument ${flag}`)
    }
  }
  if (short) for (const k of Object.keys(settings.counts)) settings.counts[k] = Math.ceil((settings.counts[k] as number) / 20)
  Object.assign(settings.counts, explicit)
  return settings
}

async function replay(settings: Settings): Promise<number> {
  const spec = settings.replay as string
  const colon = spec.indexOf(':')
  const campaign = CAMPAIGNS.find((c) => c.name === spec.slice(0, colon))
  if (colon < 0 || !campaign) usage(`--replay wants CAMPAIGN:CASE with CAMPAIGN one of ${CAMPAIGNS.map((c) => c.name).join(', ')}`)
  const caseId = spec.slice(colon + 1)
  console.log(`torture: replaying ${campaign.name} case ${caseId} of seed ${settings.seed}`)
  const crashes: string[] = []
  const release = catchCrashes((m) => crashes.push(m))
  try {
    await campaign.replay(settings.seed, caseId, settings.deadlineMs)
  } catch (err) {
    console.log(`FAIL ${campaign.name} case ${caseId}: ${err instanceof Error && err.name === 'Error' ? err.message : describe(err)}`)
    return 1
  } finally {
    release()
  }
  if (crashes.length > 0) {
    for (const c of crashes) console.log(`FAIL ${campaign.name} case ${caseId}: ${c}`)
    return 1
  }
  console.log('torture: case passed')
  return 0
}

async function main(): Promise<number> {
  const settings = parseArgs(process.argv.slice(2))
  if (settings.replay !== null) return replay(settings)
  const started = Date.now()
  const stopAt = started + settings.timeLimitMs
  console.log(`torture: seed ${settings.seed}; ${CAMPAIGNS.map((c) => `${c.name} ${settings.counts[c.name]}`).join(', ')}`)
  const failures: Failure[] = []
  let current = ''
  const release = catchCrashes((message) => {
    failures.push({ campaign: current, caseId: '?', message })
    console.log(`FAIL ${current}: ${message} (uncaught in-process error during this campaign: the case is not known; rerun the campaign with the same seed and a smaller count to narrow it down)`)
  })
  let stoppedByTime = false
  const summary: string[] = []
  try {
    for (const campaign of CAMPAIGNS) {
      const count = settings.counts[campaign.name] as number
      if (count === 0) continue
      current = campaign.name
      const t0 = Date.now()
      const result = await campaign.run({
        count,
        seed: settings.seed,
        stopAt,
        deadlineMs: settings.deadlineMs,
        onFailure: (f) => {
          failures.push(f)
          if (failures.length <= 20) {
            console.log(`FAIL ${f.campaign} case ${f.caseId}: ${f.message}`)
            console.log(`  replay: npm run torture -- --seed ${settings.seed} --replay ${f.campaign}:${f.caseId}`)
          }
        },
      })
      stoppedByTime ||= result.stoppedByTime
      const seconds = (Date.now() - t0) / 1000
      const details = Object.entries(result.counts).map(([k, v]) => `${v} ${k}`).join(', ')
      const line = `${campaign.name}: ${result.done}/${count} ${campaign.unit} in ${seconds.toFixed(1)} s, ${result.failures} failures (${details})${result.stoppedByTime ? ' [stopped by the time limit]' : ''}`
      summary.push(line)
      console.log(`torture: ${line}`)
    }
  } finally {
    release()
  }
  console.log(`torture: seed ${settings.seed}, ${((Date.now() - started) / 1000).toFixed(1)} s`)
  for (const line of summary) console.log(`  ${line}`)
  if (failures.length > 0) {
    console.log(`torture: ${failures.length} FAILURES (seed ${settings.seed}); replay one with --seed ${settings.seed} --replay CAMPAIGN:CASE`)
    return 1
  }
  console.log(`torture: 0 crashes, 0 hangs, 0 wrong views${stoppedByTime ? ' (stopped early by the time limit)' : ''}`)
  return 0
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`torture: internal error: ${describe(err)}`)
    process.exit(1)
  },
)
