/** Running commands to completion, and checking for the peers the fio suites drive. */
import { spawnSync } from 'node:child_process'
import { log } from './log.js'
import { MiB } from './units.js'

export function run(cmd: string, argv: string[], opts: { env?: NodeJS.ProcessEnv; allowFail?: boolean; input?: string } = {}) {
  const r = spawnSync(cmd, argv, { encoding: 'utf8', env: opts.env ?? process.env, maxBuffer: 64 * MiB, input: opts.input })
  if (r.status !== 0 && !opts.allowFail) {
    throw new Error(`${cmd} ${argv.join(' ')} failed (${r.status ?? r.signal}): ${(r.stderr || r.stdout || '').slice(-800)}`)
  }
  return r
}

function have(bin: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${bin}`]).status === 0
}

export function ensurePeers(): void {
  const needed = ['nbdkit', 'qemu-nbd', 'qemu-img', 'qemu-io', 'fio', 'nbdinfo']
  const fioNbd = () => have('fio') && spawnSync('fio', ['--enghelp=nbd']).status === 0
  if (needed.every(have) && fioNbd()) return
  log(`installing peers (missing: ${needed.filter((b) => !have(b)).join(' ') || 'fio nbd engine'})`)
  run('apt-get', ['update'])
  run('apt-get', ['install', '-y', 'nbdkit', 'qemu-utils', 'fio', 'libnbd-bin'], { env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } })
  const still = needed.filter((b) => !have(b))
  if (still.length > 0 || !fioNbd()) throw new Error(`peers still missing after apt-get: ${still.join(' ') || 'fio nbd engine'}`)
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

export async function timed<T>(fn: () => Promise<T>): Promise<[number, T]> {
  const t = performance.now()
  const v = await fn()
  return [(performance.now() - t) / 1000, v]
}
