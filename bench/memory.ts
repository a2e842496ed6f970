/**
 * Server memory under many pipelined large writes, and after the clients leave (issue 13):
 * `blocksnap serve` on a scratch volume, CONNECTIONS NBD clients (fio's nbd engine: one libnbd
 * connection per job) each keeping PER writes of 32 MiB in flight, the server's RSS sampled from
 * /proc while they run (peak: VmHWM) and for a while after they disconnect.
 *
 *   npx tsx bench/memory.ts [--connections 16] [--per 4] [--settle 10] [--bin PATH] [-- serve options]
 *
 * `--bin` picks another launcher (e.g. an older checkout's bin/blocksnap) for a before/after
 * figure; anything after `--` goes to `serve` (e.g. `--max-pending 64M`). Prints one JSON object;
 * BENCH_MEMORY_SMAPS=1 also lists the server's largest mappings once the clients are gone (a
 * large [heap] there is the allocator keeping freed memory, not live objects).
 */
import { readFileSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { spawn } from 'node:child_process'
import { connect } from 'node:net'
import { Volume } from '../src/volume/volume.js'
import { pathToFileURL } from 'node:url'
import { freePort } from './lib/free-port.js'

const MiB = 1024 * 1024
const WRITE_BYTES = 32 * MiB

function memoryOf(pid: number): { rssMiB: number; peakMiB: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN)
  return { rssMiB: Math.round(kib('VmRSS') / 1024), peakMiB: Math.round(kib('VmHWM') / 1024) }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

export interface MemoryOptions {
  readonly connections: number
  readonly perConnection: number
  readonly settleSeconds: number
  /** The launcher to measure (another checkout's bin/blocksnap gives a before/after figure). */
  readonly bin: string
  readonly serveExtra: readonly string[]
}

export type MemoryResult = Awaited<ReturnType<typeof measureServeMemory>>

export const DEFAULT_BIN = new URL('../bin/blocksnap', import.meta.url).pathname

export async function measureServeMemory(options: MemoryOptions) {
const { connections, perConnection, settleSeconds, bin, serveExtra } = options
const root = await mkdtemp(join(tmpdir(), 'bs-bench-memory-'))
const vol = join(root, 'vol')
// Every client writes the same four 32 MiB regions: the file stays small, the page cache absorbs it.
await Volume.create(vol, { sizeBytes: Math.max(4, perConnection) * WRITE_BYTES })
const port = await freePort()
// --max-connections only when above the default, so launchers from before the option still run.
const limit = connections > 16 ? ['--max-connections', String(connections)] : []
const child = spawn(bin, ['serve', vol, '--listen', `127.0.0.1:${port}`, ...limit, ...serveExtra], {
  stdio: ['ignore', 'ignore', 'pipe'],
  env: { ...process.env, BLOCKSNAP_LOG_LEVEL: 'warn' },
})
let log = ''
child.stderr.on('data', (d: Buffer) => {
  log += d.toString()
})
try {
  // Up once it accepts a connection.
  for (let tries = 0; ; tries++) {
    try {
      await new Promise<void>((resolve, reject) => {
        const probe = connect({ port, host: '127.0.0.1' }, () => {
          probe.destroy()
          resolve()
        })
        probe.once('error', reject)
      })
      break
    } catch {
      if (tries > 300 || child.exitCode !== null) throw new Error(`serve did not come up:\n${log}`)
      await sleep(100)
    }
  }
  const pid = child.pid as number
  await sleep(1000)
  const idle = memoryOf(pid)

  let sampledPeakMiB = 0
  const sampler = setInterval(() => {
    sampledPeakMiB = Math.max(sampledPeakMiB, memoryOf(pid).rssMiB)
  }, 50)
  const started = performance.now()
  // Every job writes the same PER regions of 32 MiB, all in flight at once (iodepth = PER).
  const fio = spawn(
    'fio',
    [
      '--name=memory',
      '--ioengine=nbd',
      `--uri=nbd://127.0.0.1:${port}/vol`,
      '--rw=write',
      `--bs=${WRITE_BYTES}`,
      `--size=${perConnection * WRITE_BYTES}`,
      `--iodepth=${perConnection}`,
      `--iodepth_batch_submit=${perConnection}`,
      `--numjobs=${connections}`,
      '--group_reporting',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  )
  let fioErr = ''
  fio.stderr.on('data', (d: Buffer) => (fioErr += d.toString()))
  const fioCode = await new Promise<number | null>((resolve) => fio.once('exit', resolve))
  if (fioCode !== 0) throw new Error(`fio failed (${fioCode}): ${fioErr}`)
  const seconds = (performance.now() - started) / 1000
  clearInterval(sampler)
  const loaded = memoryOf(pid)
  const after: number[] = []
  for (let s = 0; s < settleSeconds; s++) {
    await sleep(1000)
    after.push(memoryOf(pid).rssMiB)
  }
  return {
    bin,
    serveOptions: serveExtra,
    connections,
    writesPerConnection: perConnection,
    writeMiB: WRITE_BYTES / MiB,
    totalMiB: (connections * perConnection * WRITE_BYTES) / MiB,
    seconds: Number(seconds.toFixed(2)),
    idleRssMiB: idle.rssMiB,
    peakRssMiB: loaded.peakMiB,
    sampledPeakRssMiB: sampledPeakMiB,
    rssAfterClientsLeftMiB: after,
  }
  if (process.env.BENCH_MEMORY_SMAPS) {
    const maps = readFileSync(`/proc/${pid}/smaps`, 'utf8').split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/)
    const rows = maps.map((m) => [Number(/^Rss:\s+(\d+)/m.exec(m)?.[1] ?? 0), m.split('\n')[0]] as const).sort((a, b) => b[0] - a[0]).slice(0, 12)
    for (const [rss, head] of rows) process.stderr.write(`${rss} kB  ${head}\n`)
  }
} finally {
  child.kill('SIGTERM')
  await new Promise((resolve) => child.once('exit', resolve))
  await rm(root, { recursive: true, force: true })
}
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
const argv = process.argv.slice(2)
const dashDash = argv.indexOf('--')
const own = dashDash >= 0 ? argv.slice(0, dashDash) : argv
const serveExtra = dashDash >= 0 ? argv.slice(dashDash + 1) : []
const get = (flag: string, fallback: string) => {
  const k = own.indexOf(flag)
  return k >= 0 ? (own[k + 1] as string) : fallback
}
const connections = Number(get('--connections', '16'))
const perConnection = Number(get('--per', '4'))
const settleSeconds = Number(get('--settle', '10'))
const bin = get('--bin', DEFAULT_BIN)

  const result = await measureServeMemory({ connections, perConnection, settleSeconds, bin, serveExtra })
  process.stdout.write(`${JSON.stringify(result, null, 2)}\n`)
}
