/**
 * The bench's shared command-line options. They are echoed into results.json (`args`), so a
 * suite's own options stay in its module (read with `option()`), not here.
 */
import { resolve } from 'node:path'
import { GiB, KiB, MiB, TiB } from './units.js'

export interface Args {
  runtime: number
  rounds: number
  size: number
  max: number
  openN: number
  only: Set<string>
  profile: string | null
  write: boolean
}

/** The value after `flag` in argv, if the flag is present. */
export function option(argv: readonly string[], flag: string): string | undefined {
  const k = argv.indexOf(flag)
  return k >= 0 ? argv[k + 1] : undefined
}

export function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]?)$/i.exec(text)
  if (!m) throw new Error(`bad size ${text}`)
  const unit = { '': 1, K: KiB, M: MiB, G: GiB, T: TiB }[(m[2] ?? '').toUpperCase() as '' | 'K' | 'M' | 'G' | 'T']
  return Number(m[1]) * unit
}

/** `suiteNames` is every registered suite, in order: the default for --only. */
export function parseArgs(argv: readonly string[], suiteNames: readonly string[]): Args {
  const get = (flag: string) => option(argv, flag)
  const only = get('--only')
  const picked = only ? only.split(',') : [...suiteNames]
  const unknown = picked.filter((name) => !suiteNames.includes(name))
  if (unknown.length > 0) throw new Error(`--only: no suite named ${unknown.join(', ')} (suites: ${suiteNames.join(', ')})`)
  return {
    runtime: Number(get('--runtime') ?? 5),
    rounds: Number(get('--rounds') ?? 2),
    size: parseSize(get('--size') ?? '512M'),
    max: argv.includes('--full') ? 1e8 : Number(get('--max') ?? 1e7),
    openN: Number(get('--open') ?? 1e7),
    only: new Set(picked),
    profile: get('--profile') ? resolve(get('--profile') as string) : null,
    write: !argv.includes('--no-write'),
  }
}
