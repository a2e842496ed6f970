/**
 * One fio job against a server (nbd engine) or a local file (io_uring), with the CPU that other
 * processes used meanwhile (/proc/stat minus fio, the server and this process), so noise shows.
 */
import { spawn } from 'node:child_process'
import { loadavg1, procTicks, systemBusyTicks, TICK, vmRunning } from './cpu.js'
import { log } from './log.js'
import type { Server } from './servers.js'

export interface Job {
  readonly name: string
  readonly rw: 'randread' | 'randwrite' | 'read' | 'write'
  readonly bs: string
  readonly iodepth: number
  readonly timeBased?: boolean
  readonly runtime?: number
  readonly offset?: number
  readonly size?: number
  readonly ioSize?: number
  readonly fsync?: number
  readonly extra?: readonly string[]
}

export interface FioResult {
  job: string
  server: string
  iops: number
  mibps: number
  p99us: number
  ioBytes: number
  seconds: number
  /** CPU other processes used during the job, in cores. */
  foreignCores: number
  vmRunning: boolean
  loadavg1: number
  error?: string
}

/** fio on a file with no server at all. */
export interface LocalTarget {
  label: string
  uri: null
  pid: number
  sizeBytes: number
  file: string
}

/** The standard time-based jobs, each running `runtimeSeconds`. */
export const JOBS = {
  randread4k: (runtimeSeconds: number): Job => ({ name: 'randread4k', rw: 'randread', bs: '4k', iodepth: 32, timeBased: true, runtime: runtimeSeconds }),
  randwrite4k: (runtimeSeconds: number): Job => ({ name: 'randwrite4k', rw: 'randwrite', bs: '4k', iodepth: 32, timeBased: true, runtime: runtimeSeconds }),
  seqread1m: (runtimeSeconds: number): Job => ({ name: 'seqread1m', rw: 'read', bs: '1M', iodepth: 8, timeBased: true, runtime: runtimeSeconds }),
  seqwrite1m: (runtimeSeconds: number): Job => ({ name: 'seqwrite1m', rw: 'write', bs: '1M', iodepth: 8, timeBased: true, runtime: runtimeSeconds }),
  fsync4k: (runtimeSeconds: number): Job => ({ name: 'fsync4k', rw: 'randwrite', bs: '4k', iodepth: 32, timeBased: true, runtime: runtimeSeconds, fsync: 32 }),
}

export async function fio(server: Server | LocalTarget, job: Job): Promise<FioResult> {
  const argv = [
    `--name=${job.name}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    `--size=${job.size ?? server.sizeBytes}`,
    '--output-format=json',
    ...(job.offset !== undefined ? [`--offset=${job.offset}`] : []),
    ...(job.ioSize !== undefined ? [`--io_size=${job.ioSize}`] : []),
    ...(job.runtime !== undefined ? [`--runtime=${job.runtime}`] : []),
    ...(job.timeBased ? ['--time_based'] : []),
    ...(job.fsync !== undefined ? [`--fsync=${job.fsync}`] : []),
    ...(job.extra ?? []),
  ]
  if (server.uri !== null) argv.push('--ioengine=nbd', `--uri=${server.uri}`)
  else argv.push('--ioengine=io_uring', `--filename=${(server as LocalTarget).file}`)
  const vm0 = vmRunning()
  const load = loadavg1()
  const b0 = systemBusyTicks()
  const s0 = server.pid > 0 ? procTicks(server.pid) : 0
  const m0 = procTicks('self', true)
  const t0 = performance.now()
  const out = await new Promise<{ code: number | null; stdout: string; stderr: string }>((res) => {
    const c = spawn('fio', argv, { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    c.on('exit', (code) => res({ code, stdout, stderr }))
  })
  const wall = (performance.now() - t0) / 1000
  const ours = (server.pid > 0 ? procTicks(server.pid) - s0 : 0) + (procTicks('self', true) - m0)
  const foreign = Math.max(0, systemBusyTicks() - b0 - ours) / TICK / wall
  const base: FioResult = {
    job: job.name,
    server: server.label,
    iops: 0,
    mibps: 0,
    p99us: 0,
    ioBytes: 0,
    seconds: wall,
    foreignCores: Number(foreign.toFixed(2)),
    vmRunning: vm0 || vmRunning(),
    loadavg1: load,
  }
  const at = out.stdout.indexOf('{')
  if (out.code !== 0 || at < 0) {
    const error = `fio exit ${out.code}: ${(out.stderr || out.stdout).slice(-500)}`
    log(`  ${server.label} ${job.name}: ERROR ${error}`)
    return { ...base, error }
  }
  const j = JSON.parse(out.stdout.slice(at)) as { jobs: Array<Record<string, Record<string, unknown>>> }
  const jj = j.jobs[0] as Record<string, Record<string, unknown>>
  const dir = job.rw.includes('read') ? (jj.read as Record<string, unknown>) : (jj.write as Record<string, unknown>)
  const clat = (dir.clat_ns ?? {}) as { percentile?: Record<string, number> }
  const r: FioResult = {
    ...base,
    iops: Math.round(dir.iops as number),
    mibps: Number(((dir.bw as number) / 1024).toFixed(1)),
    p99us: Math.round((clat.percentile?.['99.000000'] ?? 0) / 1000),
    ioBytes: dir.io_bytes as number,
    seconds: Number(((dir.runtime as number) / 1000).toFixed(2)),
  }
  log(`  ${server.label.padEnd(28)} ${job.name.padEnd(14)} ${String(r.iops).padStart(7)} IOPS ${r.mibps.toFixed(1).padStart(8)} MiB/s p99 ${r.p99us} us${r.foreignCores > 0.2 ? ` (other load ${r.foreignCores} cores${r.vmRunning ? ', VM running' : ''})` : ''}`)
  return r
}

/** The figure a job is judged by: MiB/s for 1M jobs, IOPS otherwise (NaN when it did not run). */
export function metric(r: FioResult | undefined, job: string): number {
  return r ? (job.includes('1m') ? r.mibps : r.iops) : NaN
}

export function unit(job: string): string {
  return job.includes('1m') ? 'MiB/s' : 'IOPS'
}
