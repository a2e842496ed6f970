/**
 * `npm run bench`: side-by-side benchmarks of blocksnap against nbdkit, qemu-nbd and the machine's
 * own limit, all over 127.0.0.1, all driven by the same fio `nbd`-engine jobs in one run.
 * Writes BENCHMARKS.md (ratios against the floors of issue 7, raw figures beside them, the
 * machine) and bench/results.json.
 *
 *   npm run bench [-- --runtime 5] [--rounds 2] [--size 512M] [--max 1e7] [--open 1e7]
 *                   [--full (exception table up to 1e8)] [--only startup,standard,firsttouch,snapread,merge,scale,big]
 *                   [--profile DIR (blocksnap servers run with --cpu-prof into DIR)] [--no-write]
 *
 * Ratios are only ever taken between figures of the same round, and rounds interleave every
 * server, so a load spike elsewhere on the machine lands on both sides of most ratios. Each fio
 * job records how much CPU other processes used meanwhile (/proc/stat minus fio, the server and
 * this process), so noise is visible in the raw tables.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process'
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync, ftruncateSync } from 'node:fs'
import { connect } from 'node:net'
import { cpus, release, tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { FileDevice } from '../src/device/file-device.js'
import { writeEntry } from '../src/format/area.js'
import { encodeHeader } from '../src/format/header.js'
import { FORMAT_VERSION, areaChunk, dataChunkOfEntry, layoutFor } from '../src/format/layout.js'
import { Origin } from '../src/snapshot/origin.js'
import { Snapshot } from '../src/snapshot/snapshot.js'
import { PersistentStore } from '../src/store/persistent-store.js'
import { Volume } from '../src/volume/volume.js'
import { freePort } from '../test/support/free-port.js'
import { permuter } from './permuter.js'
import { type StartupResult, startupBench } from './startup.js'

const HERE = dirname(fileURLToPath(import.meta.url))
const ROOT = resolve(HERE, '..')
const KiB = 1024
const MiB = 1024 * KiB
const GiB = 1024 * MiB
const TiB = 1024 * GiB

// ------------------------------------------------------------------------------ arguments

interface Args {
  runtime: number
  rounds: number
  size: number
  max: number
  openN: number
  only: Set<string>
  profile: string | null
  write: boolean
}

function parseArgs(argv: string[]): Args {
  const get = (flag: string): string | undefined => {
    const k = argv.indexOf(flag)
    return k >= 0 ? argv[k + 1] : undefined
  }
  const size = (text: string): number => {
    const m = /^(\d+)([KMGT]?)$/i.exec(text)
    if (!m) throw new Error(`bad size ${text}`)
    const unit = { '': 1, K: KiB, M: MiB, G: GiB, T: TiB }[(m[2] ?? '').toUpperCase() as '' | 'K' | 'M' | 'G' | 'T']
    return Number(m[1]) * unit
  }
  const all = ['startup', 'standard', 'firsttouch', 'snapread', 'merge', 'scale', 'big']
  const only = get('--only')
  return {
    runtime: Number(get('--runtime') ?? 5),
    rounds: Number(get('--rounds') ?? 2),
    size: size(get('--size') ?? '512M'),
    max: argv.includes('--full') ? 1e8 : Number(get('--max') ?? 1e7),
    openN: Number(get('--open') ?? 1e7),
    only: new Set(only ? only.split(',') : all),
    profile: get('--profile') ? resolve(get('--profile') as string) : null,
    write: !argv.includes('--no-write'),
  }
}

const args = parseArgs(process.argv.slice(2))
const log = (msg: string) => process.stderr.write(`[bench ${((performance.now() - T0) / 1000).toFixed(0).padStart(4)}s] ${msg}\n`)
const T0 = performance.now()

// ------------------------------------------------------------------------------ processes

function run(cmd: string, argv: string[], opts: { env?: NodeJS.ProcessEnv; allowFail?: boolean; input?: string } = {}) {
  const r = spawnSync(cmd, argv, { encoding: 'utf8', env: opts.env ?? process.env, maxBuffer: 64 * MiB, input: opts.input })
  if (r.status !== 0 && !opts.allowFail) {
    throw new Error(`${cmd} ${argv.join(' ')} failed (${r.status ?? r.signal}): ${(r.stderr || r.stdout || '').slice(-800)}`)
  }
  return r
}

function have(bin: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${bin}`]).status === 0
}

function ensurePeers(): void {
  const needed = ['nbdkit', 'qemu-nbd', 'qemu-img', 'qemu-io', 'fio', 'nbdinfo']
  const fioNbd = () => have('fio') && spawnSync('fio', ['--enghelp=nbd']).status === 0
  if (needed.every(have) && fioNbd()) return
  log(`installing peers (missing: ${needed.filter((b) => !have(b)).join(' ') || 'fio nbd engine'})`)
  run('apt-get', ['update'])
  run('apt-get', ['install', '-y', 'nbdkit', 'qemu-utils', 'fio', 'libnbd-bin'], { env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } })
  const still = needed.filter((b) => !have(b))
  if (still.length > 0 || !fioNbd()) throw new Error(`peers still missing after apt-get: ${still.join(' ') || 'fio nbd engine'}`)
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

function canConnect(port: number): Promise<boolean> {
  return new Promise((res) => {
    const c = connect({ host: '127.0.0.1', port })
    c.once('connect', () => {
      c.destroy()
      res(true)
    })
    c.once('error', () => res(false))
  })
}

interface Server {
  readonly label: string
  readonly uri: string
  readonly pid: number
  readonly sizeBytes: number
  stop(): Promise<void>
}

async function startServer(label: string, cmd: string, argv: string[], port: number, exportName: string, env?: NodeJS.ProcessEnv): Promise<Server> {
  const logPath = join(WORK, `${label.replace(/[^A-Za-z0-9]+/g, '_')}-${port}.log`)
  const fd = openSync(logPath, 'a')
  const child: ChildProcess = spawn(cmd, argv, { stdio: ['ignore', fd, fd], env: env ?? process.env })
  closeSync(fd)
  let exited = false
  const exit = new Promise<void>((res) => child.once('exit', () => ((exited = true), res())))
  const uri = `nbd://127.0.0.1:${port}/${exportName}`
  const tail = () => readFileSync(logPath, 'utf8').slice(-1500)
  const deadline = Date.now() + 60_000
  let sizeBytes = 0
  for (;;) {
    if (exited) throw new Error(`${label} exited during start-up: ${tail()}`)
    if (Date.now() > deadline) {
      child.kill('SIGKILL')
      throw new Error(`${label} did not start: ${tail()}`)
    }
    if (await canConnect(port)) {
      const r = run('nbdinfo', ['--size', uri], { allowFail: true })
      if (r.status === 0) {
        sizeBytes = Number(r.stdout.trim())
        break
      }
    }
    await sleep(100)
  }
  const pid = child.pid as number
  return {
    label,
    uri,
    pid,
    sizeBytes,
    async stop() {
      if (exited) return
      process.kill(pid, 'SIGTERM')
      const t = setTimeout(() => {
        if (!exited) process.kill(pid, 'SIGKILL')
      }, 30_000)
      await exit
      clearTimeout(t)
    },
  }
}

const startNbdkitFile = async (file: string) => {
  const port = await freePort()
  return startServer('nbdkit file', 'nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), 'file', file], port, '')
}
const startNbdkitMemory = async (size: number) => {
  const port = await freePort()
  return startServer('nbdkit memory', 'nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), 'memory', String(size)], port, '')
}
const startNbdkitCow = async (file: string) => {
  const port = await freePort()
  return startServer(
    'nbdkit cow',
    'nbdkit',
    ['-f', '-i', '127.0.0.1', '-p', String(port), '--filter=cow', 'file', file, 'cow-block-size=64K'],
    port,
    '',
    { ...process.env, TMPDIR: WORK },
  )
}
/** A fresh qcow2 overlay (default 64 KiB clusters) on `base`, served by qemu-nbd. */
const startQemuOverlay = async (base: string, overlay: string, fresh = true) => {
  if (fresh) {
    rmSync(overlay, { force: true })
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay])
  }
  const port = await freePort()
  return startServer(
    'qemu-nbd qcow2',
    'qemu-nbd',
    ['-b', '127.0.0.1', '-p', String(port), '-x', 'ov', '-f', 'qcow2', '-t', '-e', '8', '--cache=writeback', overlay],
    port,
    'ov',
  )
}
let profileSeq = 0
const startBlocksnap = async (dir: string, label = 'blocksnap') => {
  const port = await freePort()
  // bin/blocksnap runs the compiled CLI (which sizes the I/O thread pool) with BLOCKSNAP_NODE_FLAGS as node flags.
  const profileOptions = args.profile
    ? `--cpu-prof --cpu-prof-dir=${args.profile} --cpu-prof-name=${label.replace(/[^A-Za-z0-9]+/g, '_')}-${++profileSeq}.cpuprofile`
    : undefined
  const env: NodeJS.ProcessEnv = { ...process.env, BLOCKSNAP_LOG_LEVEL: 'warn' }
  if (profileOptions !== undefined) env.BLOCKSNAP_NODE_FLAGS = profileOptions
  return startServer(label, join(ROOT, 'bin', 'blocksnap'), ['serve', dir, '--listen', `127.0.0.1:${port}`], port, dir.split('/').pop() as string, env)
}

// ------------------------------------------------------------------------------ CPU accounting

const TICK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100

function systemBusyTicks(): number {
  const f = (readFileSync('/proc/stat', 'utf8').split('\n')[0] as string).trim().split(/\s+/).slice(1).map(Number)
  // user nice system idle iowait irq softirq steal
  return (f[0] ?? 0) + (f[1] ?? 0) + (f[2] ?? 0) + (f[5] ?? 0) + (f[6] ?? 0) + (f[7] ?? 0)
}

function procTicks(pid: number | 'self', children = false): number {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ').map(Number)
    // fields after the comm: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
    return (f[11] ?? 0) + (f[12] ?? 0) + (children ? (f[13] ?? 0) + (f[14] ?? 0) : 0)
  } catch {
    return 0
  }
}

function vmRunning(): boolean {
  return spawnSync('pgrep', ['-f', 'qemu-system'], { encoding: 'utf8' }).status === 0
}

// ------------------------------------------------------------------------------ fio

interface Job {
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

interface FioResult {
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

const T = () => args.runtime

const JOBS = {
  randread4k: (): Job => ({ name: 'randread4k', rw: 'randread', bs: '4k', iodepth: 32, timeBased: true, runtime: T() }),
  randwrite4k: (): Job => ({ name: 'randwrite4k', rw: 'randwrite', bs: '4k', iodepth: 32, timeBased: true, runtime: T() }),
  seqread1m: (): Job => ({ name: 'seqread1m', rw: 'read', bs: '1M', iodepth: 8, timeBased: true, runtime: T() }),
  seqwrite1m: (): Job => ({ name: 'seqwrite1m', rw: 'write', bs: '1M', iodepth: 8, timeBased: true, runtime: T() }),
  fsync4k: (): Job => ({ name: 'fsync4k', rw: 'randwrite', bs: '4k', iodepth: 32, timeBased: true, runtime: T(), fsync: 32 }),
}

async function fio(server: Server | { label: string; uri: null; pid: number; sizeBytes: number; file: string }, job: Job): Promise<FioResult> {
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
  else argv.push('--ioengine=io_uring', `--filename=${(server as { file: string }).file}`)
  const vm0 = vmRunning()
  const load = Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0])
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

// ------------------------------------------------------------------------------ files

let WORK = ''
let BASE = ''

function makeBase(path: string, size: number): void {
  const fd = openSync(path, 'w')
  const piece = Buffer.alloc(MiB)
  for (let i = 0; i < piece.length; i += 4) piece.writeUInt32LE(((Math.imul(i + 1, 0x9e3779b1) | 1) >>> 0), i)
  for (let at = 0; at < size; at += MiB) {
    piece.writeUInt32LE(at / MiB, 0)
    writeSync(fd, piece, 0, Math.min(MiB, size - at), at)
  }
  closeSync(fd)
}

function copy(from: string, to: string): void {
  rmSync(to, { force: true })
  run('cp', ['--sparse=always', from, to])
}

function syncAll(): void {
  run('sync', [])
}

let volSeq = 0
async function makeVolume(snapshots: number, chunk: number): Promise<string> {
  const dir = join(WORK, `vol${++volSeq}`)
  await Volume.create(dir, { fromImage: BASE })
  if (snapshots > 0) {
    const v = await Volume.open(dir)
    try {
      for (let i = 0; i < snapshots; i++) await v.createSnapshot(`s${i}`, { chunkSizeBytes: chunk })
    } finally {
      await v.close()
    }
  }
  syncAll()
  return dir
}

function dropVolume(dir: string): void {
  rmSync(dir, { recursive: true, force: true })
}

// ------------------------------------------------------------------------------ benchmarks

interface Results {
  machine: Record<string, unknown>
  args: Record<string, unknown>
  standard: FioResult[][] // per round
  firstTouch: Array<Record<string, FioResult[]>> // per round: config -> jobs
  snapRead: FioResult[][]
  merge: Record<string, unknown>
  exceptionTable: Record<string, unknown> | null
  open: Record<string, unknown> | null
  big: Record<string, unknown> | null
  startup: StartupResult | null
  totalSeconds: number
}

const results: Results = {
  machine: {},
  args: { ...args, only: [...args.only] },
  standard: [],
  firstTouch: [],
  snapRead: [],
  merge: {},
  exceptionTable: null,
  open: null,
  big: null,
  startup: null,
  totalSeconds: 0,
}

async function withServer<T>(start: () => Promise<Server>, fn: (s: Server) => Promise<T>): Promise<T> {
  const s = await start()
  try {
    return await fn(s)
  } finally {
    await s.stop()
  }
}

const STANDARD_JOBS = () => [JOBS.randread4k(), JOBS.randwrite4k(), JOBS.seqread1m(), JOBS.seqwrite1m(), JOBS.fsync4k()]

async function standardRound(round: number): Promise<FioResult[]> {
  log(`standard jobs, round ${round}`)
  const out: FioResult[] = []
  const runAll = async (s: Server) => {
    for (const job of STANDARD_JOBS()) out.push(await fio(s, job))
  }
  // the machine's limit: fio straight on the file (page cache), no NBD
  const local = join(WORK, 'local.img')
  copy(BASE, local)
  syncAll()
  for (const job of STANDARD_JOBS()) out.push(await fio({ label: 'local file (io_uring)', uri: null, pid: 0, sizeBytes: args.size, file: local }, job))
  rmSync(local)
  await withServer(() => startNbdkitMemory(args.size), runAll)
  const file = join(WORK, 'file.img')
  copy(BASE, file)
  syncAll()
  await withServer(() => startNbdkitFile(file), runAll)
  rmSync(file)
  const dir = await makeVolume(0, 4096)
  await withServer(() => startBlocksnap(dir, 'blocksnap 0 snap'), runAll)
  dropVolume(dir)
  await withServer(() => startNbdkitCow(BASE), runAll)
  await withServer(() => startQemuOverlay(BASE, join(WORK, 'std.qcow2')), runAll)
  rmSync(join(WORK, 'std.qcow2'), { force: true })
  return out
}

/** First-touch then rewrite, on a fresh snapshot (or overlay): random 4K, sequential 1M, fsync-heavy. */
async function firstTouchJobs(s: Server): Promise<FioResult[]> {
  const q = Math.floor(s.sizeBytes / 4 / MiB) * MiB
  const out: FioResult[] = []
  const ft = await fio(s, { name: 'ft-rand4k', rw: 'randwrite', bs: '4k', iodepth: 32, offset: 0, size: 2 * q, runtime: T() })
  out.push(ft)
  out.push(await fio(s, { name: 'rw-rand4k', rw: 'randwrite', bs: '4k', iodepth: 32, offset: 0, size: 2 * q, ioSize: Math.max(4096, ft.ioBytes), runtime: 4 * T() }))
  out.push(await fio(s, { name: 'ft-seq1m', rw: 'write', bs: '1M', iodepth: 8, offset: 2 * q, size: q, runtime: 4 * T() }))
  out.push(await fio(s, { name: 'rw-seq1m', rw: 'write', bs: '1M', iodepth: 8, offset: 2 * q, size: q, runtime: 4 * T() }))
  out.push(await fio(s, { name: 'ft-fsync4k', rw: 'randwrite', bs: '4k', iodepth: 32, offset: 3 * q, size: q, runtime: T(), fsync: 32 }))
  return out
}

const FT_CONFIGS: Array<{ key: string; snaps: number; chunk: number }> = [
  { key: 'blocksnap 0 snap', snaps: 0, chunk: 4096 },
  { key: 'blocksnap 1 snap 4K', snaps: 1, chunk: 4096 },
  { key: 'blocksnap 4 snap 4K', snaps: 4, chunk: 4096 },
  { key: 'blocksnap 8 snap 4K', snaps: 8, chunk: 4096 },
  { key: 'blocksnap 1 snap 64K', snaps: 1, chunk: 65536 },
  { key: 'blocksnap 4 snap 64K', snaps: 4, chunk: 65536 },
  { key: 'blocksnap 8 snap 64K', snaps: 8, chunk: 65536 },
]

async function firstTouchRound(round: number): Promise<Record<string, FioResult[]>> {
  log(`first-touch vs rewrite, round ${round}`)
  const out: Record<string, FioResult[]> = {}
  for (const c of FT_CONFIGS) {
    const dir = await makeVolume(c.snaps, c.chunk)
    out[c.key] = await withServer(() => startBlocksnap(dir, c.key), firstTouchJobs)
    dropVolume(dir)
  }
  out['qemu-nbd qcow2'] = await withServer(() => startQemuOverlay(BASE, join(WORK, 'ft.qcow2')), firstTouchJobs)
  rmSync(join(WORK, 'ft.qcow2'), { force: true })
  out['nbdkit cow'] = await withServer(() => startNbdkitCow(BASE), firstTouchJobs)
  return out
}

/** Snapshot-export reads vs origin reads, one snapshot (4K chunks) with 25% of the chunks saved. */
async function snapReadRounds(): Promise<void> {
  log('snapshot-export reads vs origin reads')
  const dir = await makeVolume(1, 4096)
  const name = dir.split('/').pop() as string
  await withServer(
    () => startBlocksnap(dir, 'blocksnap 1 snap 4K (25% saved)'),
    async (origin) => {
      await fio(origin, { name: 'prefill-25pct', rw: 'randwrite', bs: '4k', iodepth: 32, ioSize: origin.sizeBytes / 4 })
      const snap: Server = { ...origin, label: `${name}@s0 export`, uri: origin.uri.replace(/\/[^/]*$/, `/${name}@s0`) }
      for (let r = 1; r <= args.rounds; r++) {
        const out: FioResult[] = []
        for (const job of [JOBS.randread4k(), JOBS.seqread1m()]) {
          out.push(await fio({ ...origin, label: 'origin export' }, job))
          out.push(await fio(snap, job))
        }
        results.snapRead.push(out)
      }
    },
  )
  dropVolume(dir)
}

async function timed<T>(fn: () => Promise<T>): Promise<[number, T]> {
  const t = performance.now()
  const v = await fn()
  return [(performance.now() - t) / 1000, v]
}

/** Merge of N bytes of changed chunks vs qemu-img commit of an overlay holding the same writes. */
async function mergeBench(): Promise<void> {
  const cases: Array<{ key: string; job: (size: number) => Job; bytes: number }> = [
    {
      key: 'sequential',
      bytes: Math.floor(args.size / 2),
      job: () => ({ name: 'change-seq1m', rw: 'write', bs: '1M', iodepth: 8, offset: 0, size: Math.floor(args.size / 2) }),
    },
    {
      key: 'random 4K',
      bytes: 32 * MiB,
      job: (size) => ({ name: 'change-rand4k', rw: 'randwrite', bs: '4k', iodepth: 32, size, ioSize: 32 * MiB }),
    },
  ]
  for (const c of cases) {
    log(`merge: ${c.key}, ${c.bytes / MiB} MiB changed`)
    const entry: Record<string, unknown> = { changedBytes: c.bytes }
    // blocksnap: one snapshot, the changes written to the origin over NBD, merge offline in-process
    for (const chunk of [4096, 65536]) {
      const dir = await makeVolume(1, chunk)
      await withServer(() => startBlocksnap(dir), (s) => fio(s, c.job(s.sizeBytes)))
      syncAll()
      const [seconds, steps] = await timed(async () => {
        const v = await Volume.open(dir)
        const m = await v.startMerge('s0')
        await m.done
        const n = m.stats.steps
        // the merged snapshot is dropped (manifest rewritten) just after 'complete'
        while (v.merge) await sleep(5)
        await v.close()
        return n
      })
      entry[`blocksnap ${chunk / KiB}K`] = { seconds, steps, mibps: c.bytes / MiB / seconds }
      log(`  blocksnap merge (${chunk / KiB}K chunks): ${seconds.toFixed(2)} s, ${steps} steps, ${(c.bytes / MiB / seconds).toFixed(1)} MiB/s`)
      dropVolume(dir)
    }
    // qemu: the same client writes into a fresh qcow2 overlay, then qemu-img commit
    const base = join(WORK, 'commit-base.img')
    const ov = join(WORK, 'commit.qcow2')
    copy(BASE, base)
    await withServer(() => startQemuOverlay(base, ov), (s) => fio(s, c.job(s.sizeBytes)))
    const allocated = run('qemu-img', ['info', '--output=json', ov]).stdout
    syncAll()
    const [seconds] = await timed(async () => run('qemu-img', ['commit', '-q', '-f', 'qcow2', ov]))
    entry['qemu-img commit'] = { seconds, mibps: c.bytes / MiB / seconds, overlayBytesOnDisk: (JSON.parse(allocated) as { 'actual-size': number })['actual-size'] }
    log(`  qemu-img commit: ${seconds.toFixed(2)} s, ${(c.bytes / MiB / seconds).toFixed(1)} MiB/s`)
    rmSync(base, { force: true })
    rmSync(ov, { force: true })
    results.merge[c.key] = entry
  }
  // live merge with concurrent client reads, through the CLI as a user would run it
  log('merge: live, sequential changes, with concurrent 4K random reads on the origin')
  const dir = await makeVolume(1, 4096)
  const first = cases[0] as (typeof cases)[number]
  await withServer(
    () => startBlocksnap(dir, 'blocksnap live merge'),
    async (s) => {
      await fio(s, first.job(s.sizeBytes))
      const readsAlone = await fio(s, { ...JOBS.randread4k(), name: 'reads-before-merge', runtime: 3 })
      const reads = fio(s, { ...JOBS.randread4k(), name: 'reads-during-merge', runtime: 3 * T() })
      await sleep(500)
      const [seconds] = await timed(async () => run(join(ROOT, 'bin', 'blocksnap'), ['merge', `${dir}@s0`, '--wait']))
      const during = await reads
      results.merge['live sequential with concurrent reads'] = {
        changedBytes: first.bytes,
        secondsIncludingCli: seconds,
        mibps: first.bytes / MiB / seconds,
        readIopsBefore: readsAlone.iops,
        readIopsDuringMergeWindow: during.iops,
      }
      log(`  live merge: ${seconds.toFixed(2)} s (including CLI start-up); reads ${readsAlone.iops} IOPS before, ${during.iops} IOPS over a window containing the merge`)
    },
  )
  dropVolume(dir)
}

/** Writes a kernel-format persistent COW holding `n` exceptions (data chunks left sparse). */
function writeCow(path: string, n: number, chunkBytes: number, oldOf: (i: number) => number): void {
  const layout = layoutFor(chunkBytes)
  const fd = openSync(path, 'w')
  const header = encodeHeader({ valid: true, version: FORMAT_VERSION, chunkSizeSectors: chunkBytes / 512 }, chunkBytes)
  writeSync(fd, header, 0, header.length, 0)
  const area = new Uint8Array(chunkBytes)
  let i = 0
  let k = 0
  let lastChunk = 1
  for (; i < n || k === 0 || i % layout.exceptionsPerArea === 0; k++) {
    area.fill(0)
    let e = 0
    for (; e < layout.exceptionsPerArea && i < n; e++, i++) {
      const newChunk = dataChunkOfEntry(layout, k, e)
      writeEntry(area, e, oldOf(i), newChunk)
      lastChunk = newChunk
    }
    const at = areaChunk(layout, k)
    writeSync(fd, area, 0, chunkBytes, at * chunkBytes)
    lastChunk = Math.max(lastChunk, at)
    if (e < layout.exceptionsPerArea) break
  }
  ftruncateSync(fd, (lastChunk + 1) * chunkBytes)
  closeSync(fd)
}

async function openBench(): Promise<void> {
  const n = args.openN
  const chunk = 4096
  const cases: Array<{ key: string; bits: number; runs: number }> = [
    // origin chunks scattered over a 8 TiB sparse origin: ~1 run per 256-chunk group
    { key: 'sparse random', bits: 31, runs: 2 },
    // ~40% of a device's chunks saved, in random order: many runs share each group
    { key: 'dense random', bits: Math.ceil(Math.log2(n * 2.5)), runs: 1 },
  ]
  const out: Record<string, unknown> = { exceptions: n, chunkBytes: chunk, note: 'page cache warm (the COW was just written); 4K chunks, 256 entries per metadata area' }
  for (const c of cases) {
    const scramble = permuter(c.bits, 0x3c6ef372)
    log(`open: a persistent COW with ${n.toExponential(0)} exceptions, ${c.key} (origin chunks over 2^${c.bits})`)
    const originPath = join(WORK, 'open-origin.img')
    const cowPath = join(WORK, 'open.cow')
    const fd = openSync(originPath, 'w')
    ftruncateSync(fd, 2 ** c.bits * chunk)
    closeSync(fd)
    const [writeSeconds] = await timed(async () => writeCow(cowPath, n, chunk, scramble))
    const measure = async () => {
      const origin = new Origin(await FileDevice.open(originPath))
      const cow = await FileDevice.open(cowPath)
      const snap = new Snapshot({ name: 'open', store: new PersistentStore(cow, { chunkBytes: chunk }) })
      const [seconds] = await timed(() => origin.addSnapshot(snap))
      const loaded = snap.table.size
      const r = { seconds, loaded, runs: snap.table.runCount, tableBytesPerException: snap.table.memoryBytes() / n }
      await origin.close()
      return r
    }
    const runs = []
    for (let r = 0; r < c.runs; r++) runs.push(await measure())
    const best = runs.reduce((a, b) => (a.seconds <= b.seconds ? a : b))
    if (best.loaded !== n) throw new Error(`open loaded ${best.loaded} exceptions, expected ${n}`)
    out[c.key] = {
      originChunksBits: c.bits,
      cowFileWriteSeconds: writeSeconds,
      secondsPerRun: runs.map((r) => r.seconds),
      exceptionsPerSecond: n / best.seconds,
      runsPerException: best.runs / n,
      tableBytesPerException: best.tableBytesPerException,
    }
    log(`  open ${c.key}: ${runs.map((r) => r.seconds.toFixed(2)).join(' s, ')} s -> ${(n / best.seconds / 1e6).toFixed(2)} M exceptions/s`)
    rmSync(originPath)
    rmSync(cowPath)
  }
  results.open = out
}

async function exceptionTableBench(): Promise<void> {
  log(`exception table: bench/exception-table.ts --max ${args.max}`)
  const r = run(process.execPath, ['--import', 'tsx', join(HERE, 'exception-table.ts'), '--max', String(args.max)])
  process.stderr.write(r.stdout)
  const json = JSON.parse(readFileSync(join(HERE, 'results-exception-table.json'), 'utf8')) as {
    results: Array<{ case: string; n: number; bytesPerException: number; insertsPerSec: number; lookupHitsPerSec: number }>
  }
  results.exceptionTable = json as unknown as Record<string, unknown>
}

/** A sparse 16 TiB origin: create, snapshot, serve, a few I/Os at random over the whole range. */
async function bigBench(): Promise<void> {
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
    () => startBlocksnap(dir, 'blocksnap 16 TiB'),
    async (s) => {
      out.serveReadySeconds = (performance.now() - t) / 1000
      out.nbdinfoSize = s.sizeBytes
      const sparse = ['--norandommap', '--randrepeat=0']
      out.randwrite = await fio(s, { name: 'big-ft-randwrite4k', rw: 'randwrite', bs: '4k', iodepth: 32, ioSize: 32 * MiB, runtime: 2 * T(), extra: sparse })
      out.randread = await fio(s, { name: 'big-randread4k', rw: 'randread', bs: '4k', iodepth: 32, ioSize: 32 * MiB, runtime: 2 * T(), extra: sparse })
      const name = dir.split('/').pop() as string
      const snap: Server = { ...s, label: 'blocksnap 16 TiB @s0', uri: s.uri.replace(/\/[^/]*$/, `/${name}@s0`) }
      out.snapRandread = await fio(snap, { name: 'big-snap-randread4k', rw: 'randread', bs: '4k', iodepth: 32, ioSize: 32 * MiB, runtime: 2 * T(), extra: sparse })
    },
  )
  out.diskBytesUsed = Number(run('du', ['-sB1', dir]).stdout.split('\t')[0])
  results.big = out
  rmSync(dir.startsWith('/dev/shm') ? dirname(dir) : dir, { recursive: true, force: true })
}

// ------------------------------------------------------------------------------ report

const median = (xs: number[]): number => {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b)
  if (s.length === 0) return NaN
  const m = Math.floor(s.length / 2)
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2
}

function machine(): Record<string, unknown> {
  const v = (cmd: string, a: string[]) => (run(cmd, a, { allowFail: true }).stdout || '').split('\n')[0]?.trim()
  return {
    nproc: Number(v('nproc', [])),
    cpu: cpus()[0]?.model ?? 'unknown',
    memGiB: Number((Number(/MemTotal:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0) / MiB).toFixed(1)),
    kernel: release(),
    node: process.version,
    fio: v('fio', ['--version']),
    nbdkit: v('nbdkit', ['--version']),
    qemu: v('qemu-img', ['--version']),
    filesystem: v('sh', ['-c', `df -T ${WORK} | tail -1 | awk '{print $2}'`]),
    // What the blocksnap command gives the servers (it sizes the pool when UV_THREADPOOL_SIZE is unset).
    uvThreadpoolSize: process.env.UV_THREADPOOL_SIZE ?? `${Math.min(16, Math.max(1, cpus().length - 1))} (blocksnap default: cores - 1)`,
  }
}

function fmt(x: number, digits = 2): string {
  return Number.isFinite(x) ? x.toFixed(digits) : 'n/a'
}
function k(x: number): string {
  if (!Number.isFinite(x)) return 'n/a'
  return x >= 10000 ? `${(x / 1000).toFixed(1)}k` : String(Math.round(x))
}

interface FloorRow {
  what: string
  floor: string
  ok: (r: number) => boolean
  ratios: number[]
  raw: string
}

function build(): { md: string; floors: Array<Record<string, unknown>> } {
  const rows: FloorRow[] = []
  const std = (round: FioResult[], server: string, job: string) => round.find((r) => r.server === server && r.job === job && !r.error)
  const metric = (r: FioResult | undefined, job: string) => (r ? (job.includes('1m') ? r.mibps : r.iops) : NaN)
  const unit = (job: string) => (job.includes('1m') ? 'MiB/s' : 'IOPS')
  const per = <R>(rounds: R[], f: (r: R) => [number, number]) => rounds.map(f)
  const rawPairs = (pairs: Array<[number, number]>, a: string, b: string, u: string) =>
    `${a} ${pairs.map((p) => k(p[0])).join(' / ')} vs ${b} ${pairs.map((p) => k(p[1])).join(' / ')} ${u}`

  for (const [job, floor] of [['randread4k', 0.7], ['randwrite4k', 0.7], ['seqread1m', 0.9], ['seqwrite1m', 0.9]] as const) {
    const pairs = per(results.standard, (r) => [metric(std(r, 'blocksnap 0 snap', job), job), metric(std(r, 'nbdkit file', job), job)])
    rows.push({
      what: `No snapshot: ${job} vs nbdkit file`,
      floor: `≥ ${floor}`,
      ok: (x) => x >= floor,
      ratios: pairs.map(([a, b]) => a / b),
      raw: rawPairs(pairs, 'blocksnap', 'nbdkit', unit(job)),
    })
  }
  const ft = (round: Record<string, FioResult[]>, cfg: string, job: string) => round[cfg]?.find((r) => r.job === job && !r.error)
  for (const job of ['ft-rand4k', 'ft-seq1m']) {
    for (const [cfg, floor] of [['blocksnap 1 snap 4K', 0.5], ['blocksnap 4 snap 4K', 0.25], ['blocksnap 1 snap 64K', 0.5], ['blocksnap 4 snap 64K', 0.25]] as const) {
      const pairs = per(results.firstTouch, (r) => [metric(ft(r, cfg, job), job), metric(ft(r, 'blocksnap 0 snap', job), job)])
      rows.push({
        what: `First-touch ${job.slice(3)}: ${cfg.slice(10)} vs 0 snapshots`,
        floor: `≥ ${floor}`,
        ok: (x) => x >= floor,
        ratios: pairs.map(([a, b]) => a / b),
        raw: rawPairs(pairs, cfg.slice(10), '0 snap', unit(job)),
      })
    }
    for (const cfg of ['blocksnap 1 snap 4K', 'blocksnap 1 snap 64K']) {
      const pairs = per(results.firstTouch, (r) => [metric(ft(r, cfg, job), job), metric(ft(r, 'qemu-nbd qcow2', job), job)])
      rows.push({
        what: `First-touch ${job.slice(3)}: ${cfg.slice(10)} vs qemu-nbd qcow2 overlay`,
        floor: '≥ 1.0',
        ok: (x) => x >= 1,
        ratios: pairs.map(([a, b]) => a / b),
        raw: rawPairs(pairs, 'blocksnap', 'qcow2', unit(job)),
      })
    }
  }
  for (const job of ['randread4k', 'seqread1m']) {
    const pairs = results.snapRead.map((round): [number, number] => [
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
  for (const key of ['sequential', 'random 4K']) {
    const e = results.merge[key] as Record<string, { mibps: number; seconds: number }> | undefined
    if (!e) continue
    const q = e['qemu-img commit']
    for (const c of ['blocksnap 4K', 'blocksnap 64K']) {
      const b = e[c]
      if (!b || !q) continue
      rows.push({
        what: `Merge, ${key} changes (${(e.changedBytes as unknown as number) / MiB} MiB), ${c.slice(10)} chunks vs qemu-img commit`,
        floor: '≥ 0.7',
        ok: (x) => x >= 0.7,
        ratios: [b.mibps / q.mibps],
        raw: `${fmt(b.seconds)} s (${fmt(b.mibps, 0)} MiB/s) vs ${fmt(q.seconds)} s (${fmt(q.mibps, 0)} MiB/s)`,
      })
    }
  }
  const et = results.exceptionTable as { results: Array<{ case: string; n: number; bytesPerException: number }> } | null
  if (et) {
    const nMax = Math.max(...et.results.map((r) => r.n))
    for (const r of et.results.filter((x) => x.n === nMax && !x.case.startsWith('sequential'))) {
      rows.push({
        what: `Exception table memory, ${r.case}, N = ${r.n.toExponential(0)}${nMax < 1e8 ? ' (1e8: run with --full)' : ''}`,
        floor: '≤ 24 B',
        ok: (x) => x <= 24,
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
  if (results.startup) {
    const st = results.startup
    const ms = (x: number) => `${fmt(x * 1000, 0)} ms`
    for (const [what, floor, ratios, seconds] of [
      ['Start-up: `blocksnap --version` vs `node -e 0`', 3, st.versionRatios, st.versionSeconds],
      ['Start-up: `blocksnap list VOL` vs `node -e 0`', 4, st.listRatios, st.listSeconds],
    ] as const) {
      rows.push({
        what: `${what} (issue 16; ${st.rounds} rounds)`,
        floor: `≤ ${floor}`,
        ok: (x) => x <= floor,
        ratios: [...ratios],
        raw: `${ms(seconds)} vs ${ms(st.nodeSeconds)} (medians)`,
      })
    }
  }
  const floors = rows.map((r) => ({
    what: r.what,
    floor: r.floor,
    ratios: r.ratios,
    median: median(r.ratios),
    met: Number.isFinite(median(r.ratios)) ? r.ok(median(r.ratios)) : null,
    raw: r.raw,
  }))
  const m = results.machine
  const lines: string[] = []
  lines.push('# Benchmarks')
  lines.push('')
  lines.push('Generated by `npm run bench` (bench/run.ts); raw data in `bench/results.json`. Every server ran on')
  lines.push('127.0.0.1 over copies of the same origin file, driven by the same fio `nbd`-engine jobs in one run.')
  lines.push(`Ratios are taken inside one round; ${results.standard.length || results.firstTouch.length} rounds interleave all servers; the ratio column shows`)
  lines.push('the median and, in brackets, every round. Absolute numbers are loopback, page cache warm, one fio job (one connection).')
  lines.push('')
  lines.push(`Machine: ${m.nproc} vCPU (${m.cpu}), ${m.memGiB} GiB RAM, Linux ${m.kernel}, ${m.filesystem}; Node ${m.node}; ${m.fio}; ${m.nbdkit}; ${m.qemu}.`)
  lines.push(`Origin ${args.size / MiB} MiB; fio jobs ${args.runtime} s each; whole run ${fmt(results.totalSeconds / 60, 1)} min.`)
  lines.push('')
  lines.push('## Floors (issue 7; start-up: issue 16)')
  lines.push('')
  lines.push('| Measure | Floor | Ratio: median [rounds] | Raw | Met |')
  lines.push('| --- | --- | --- | --- | --- |')
  for (const f of floors) {
    // Many rounds (start-up) show as their range, a few as every round.
    const ratios =
      f.ratios.length > 6 ? ` [${fmt(Math.min(...f.ratios))}–${fmt(Math.max(...f.ratios))}]` : f.ratios.length > 1 ? ` [${f.ratios.map((x) => fmt(x)).join(', ')}]` : ''
    lines.push(`| ${f.what} | ${f.floor} | ${fmt(f.median)}${ratios} | ${f.raw} | ${f.met === null ? 'n/a' : f.met ? 'yes' : '**no**'} |`)
  }
  lines.push('')
  lines.push('NOTES_PLACEHOLDER')
  lines.push('')
  // noise
  const all: FioResult[] = [...results.standard.flat(), ...results.firstTouch.flatMap((r) => Object.values(r).flat()), ...results.snapRead.flat()]
  const noisy = all.filter((r) => r.foreignCores >= 0.25)
  lines.push('## Noise')
  lines.push('')
  lines.push(
    `${all.length} fio jobs; ${all.filter((r) => r.vmRunning).length} ran while a qemu-system VM was running on the machine; ${noisy.length} saw other processes use ≥ 0.25 cores ` +
      `(max ${fmt(Math.max(0, ...all.map((r) => r.foreignCores)))} cores of ${m.nproc}). The "other" column below is that figure per job.`,
  )
  lines.push('')
  // standard
  if (results.standard.length > 0) {
    lines.push('## Same jobs on every server (4K QD32, 1M QD8, fsync every 32 writes)')
    lines.push('')
    const servers = [...new Set(results.standard.flat().map((r) => r.server))]
    const jobs = [...new Set(results.standard.flat().map((r) => r.job))]
    lines.push(`| Server | ${jobs.map((j) => `${j} (${unit(j)})`).join(' | ')} | other cores |`)
    lines.push(`| --- | ${jobs.map(() => '---').join(' | ')} | --- |`)
    for (const s of servers) {
      const cells = jobs.map((j) => results.standard.map((r) => k(metric(std(r, s, j), j))).join(' / '))
      const other = Math.max(0, ...results.standard.flat().filter((r) => r.server === s).map((r) => r.foreignCores))
      lines.push(`| ${s} | ${cells.join(' | ')} | ≤ ${fmt(other)} |`)
    }
    lines.push('')
    lines.push('"local file (io_uring)" is fio on the file itself with no NBD at all: the machine\'s limit for these jobs. nbdkit memory is the NBD protocol ceiling.')
    lines.push('')
  }
  if (results.firstTouch.length > 0) {
    lines.push('## First touch vs rewrite on a fresh snapshot / overlay')
    lines.push('')
    lines.push('ft = first write to each block after the snapshot (random 4K QD32 over half the device, stopped after the runtime; 1M sequential QD8 over a quarter; 4K random with fsync every 32 writes over the last quarter); rw = the same blocks written again.')
    lines.push('')
    const jobs = ['ft-rand4k', 'rw-rand4k', 'ft-seq1m', 'rw-seq1m', 'ft-fsync4k']
    lines.push(`| Config | ${jobs.map((j) => `${j} (${unit(j)})`).join(' | ')} |`)
    lines.push(`| --- | ${jobs.map(() => '---').join(' | ')} |`)
    for (const cfg of Object.keys(results.firstTouch[0] ?? {})) {
      lines.push(`| ${cfg} | ${jobs.map((j) => results.firstTouch.map((r) => k(metric(ft(r, cfg, j), j))).join(' / ')).join(' | ')} |`)
    }
    lines.push('')
  }
  if (Object.keys(results.merge).length > 0) {
    lines.push('## Merge')
    lines.push('')
    lines.push('```json')
    lines.push(JSON.stringify(results.merge, null, 1))
    lines.push('```')
    lines.push('')
  }
  if (results.big) {
    const b = results.big as Record<string, unknown> & { randwrite?: FioResult; randread?: FioResult; snapRandread?: FioResult }
    lines.push('## 16 TiB sparse origin')
    lines.push('')
    lines.push(
      `Size ${b.sizeBytes} bytes at ${b.dir} (${(b.tried as string[]).length ? `tried first: ${(b.tried as string[]).join('; ')}` : 'first try'}); create ${fmt(b.createSeconds as number)} s, ` +
        `snapshot ${fmt(b.snapshotSeconds as number)} s, serve ready ${fmt(b.serveReadySeconds as number)} s; random 4K QD32 over the whole range: ` +
        `first-touch writes ${k(b.randwrite?.iops ?? NaN)} IOPS, origin reads ${k(b.randread?.iops ?? NaN)} IOPS, snapshot reads ${k(b.snapRandread?.iops ?? NaN)} IOPS; disk used ${fmt(((b.diskBytesUsed as number) || 0) / MiB, 1)} MiB.`,
    )
    lines.push('')
  }
  return { md: lines.join('\n') + '\n', floors }
}

// ------------------------------------------------------------------------------ main

async function main(): Promise<void> {
  ensurePeers()
  WORK = mkdtempSync(join(tmpdir(), 'blocksnap-bench-'))
  BASE = join(WORK, 'base.img')
  results.machine = machine()
  log(`work dir ${WORK}; ${JSON.stringify(results.machine)}`)
  const cleanup = () => rmSync(WORK, { recursive: true, force: true })
  process.once('SIGINT', () => {
    cleanup()
    process.exit(130)
  })
  try {
    if (args.only.has('startup')) {
      log('start-up: node -e 0, blocksnap --version, blocksnap list VOL, in turn')
      results.startup = startupBench()
    }
    makeBase(BASE, args.size)
    syncAll()
    for (let r = 1; r <= args.rounds; r++) {
      if (args.only.has('standard')) results.standard.push(await standardRound(r))
      if (args.only.has('firsttouch')) results.firstTouch.push(await firstTouchRound(r))
    }
    if (args.only.has('snapread')) await snapReadRounds()
    if (args.only.has('merge')) await mergeBench()
    if (args.only.has('scale')) {
      await exceptionTableBench()
      await openBench()
    }
    if (args.only.has('big')) await bigBench()
  } finally {
    cleanup()
  }
  results.totalSeconds = (performance.now() - T0) / 1000
  const { md, floors } = build()
  const json = JSON.stringify({ ...results, floors }, null, 1) + '\n'
  if (args.write) {
    writeFileSync(join(HERE, 'results.json'), json)
    const target = join(ROOT, 'BENCHMARKS.md')
    // Hand-written analysis below the generated part survives a re-run.
    const keep = existsSync(target) ? (/\n<!-- analysis -->\n[\s\S]*$/.exec(readFileSync(target, 'utf8'))?.[0] ?? '') : ''
    writeFileSync(target, md.replace('NOTES_PLACEHOLDER', '') + keep)
  } else {
    writeFileSync(join(WORK + '-results.json'), json)
  }
  process.stdout.write(md.split('## Noise')[0] ?? '')
  log(`done in ${fmt(results.totalSeconds / 60, 1)} min`)
}

await main()
