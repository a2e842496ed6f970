/**
 * `npm run soak [-- --minutes 10 --connections 16 --seed S]`: the real `blocksnap serve` under
 * many NBD connections for a long time while snapshots are created, removed and merged live.
 *
 * - `--connections` connections (multi-conn) to the origin export and two to every snapshot
 *   export, each running `--depth` requests at once: reads, writes, write-zeroes, trims, flushes
 *   at byte, 512-byte and 4 KiB granularity, half of them in a hot 4 MiB zone.
 * - Every view has a byte-array model: a snapshot is a copy of the origin's model at creation,
 *   then takes its own writes; a merge makes the origin's model the snapshot's at its start,
 *   origin writes during the merge land on top, and the other snapshots keep theirs. Every
 *   answered read is compared with its model, and whole views are scanned now and then and at
 *   the end; after the server stops, the volume is read back offline and compared again.
 * - Snapshot operations go through the control socket and sometimes through the CLI. Removes
 *   and merges normally close the snapshot's connections first (and sometimes check that the
 *   server refuses while they are open); a quarter use --force with the clients still running,
 *   which must then get ESHUTDOWN for everything they send.
 * - The server's RSS is read after the first tenth of the run (warm) and at the end.
 *
 * The seed fixes every random stream (the admin's choices, each lane's requests); how they
 * interleave depends on timing, so a seed replays the same workload, not the same schedule.
 * Exits 1 on any error, model mismatch, hang or RSS growth of 64 MiB or more. SOAK_TRACE=1 logs
 * how long each snapshot operation took.
 */
import { execFile } from 'node:child_process'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { basename, join } from 'node:path'
import { parseArgs } from 'node:util'
import { ControlClient } from '../src/control/control-client.js'
import { isSnapError } from '../src/errors.js'
import type { VolumeInfo } from '../src/volume/volume.js'
import { freePort } from '../test/support/free-port.js'
import { streamSeed } from '../test/support/random.js'
import { ServeProcess } from '../test/support/serve-process.js'
import { NbdClient, TransmissionFlags } from './nbd-client.js'
import { View } from './view.js'
import { Random, Stats, runLane, scanView } from './workload.js'

const REPO = new URL('..', import.meta.url).pathname
/** The package's compiled CLI, run as npm's shim runs it. */
const BIN = join(REPO, 'dist', 'cli', 'bin.cjs')
const MiB = 1024 * 1024
const RSS_GROWTH_LIMIT_BYTES = 64 * MiB
const SNAPSHOT_CONNECTIONS = 2
const MAX_SNAPSHOTS = 4
/** No request answered for this long while lanes run: the server hangs. */
const HANG_MS = 60_000

const { values: args } = parseArgs({
  options: {
    minutes: { type: 'string', default: '10' },
    connections: { type: 'string', default: '16' },
    depth: { type: 'string', default: '4' },
    seed: { type: 'string' },
    'size-mib': { type: 'string', default: '64' },
    keep: { type: 'boolean', default: false },
  },
})
const minutes = Number(args.minutes)
const connections = Number(args.connections)
const depth = Number(args.depth)
const sizeBytes = Number(args['size-mib']) * MiB
const seed = args.seed === undefined ? Math.floor(Math.random() * 2 ** 32) : Number(args.seed)
for (const [name, value] of Object.entries({ minutes, connections, depth, sizeBytes, seed })) {
  if (!Number.isFinite(value) || value < (name === 'seed' ? 0 : 0.01)) {
    process.stderr.write(`soak: error: bad --${name}\n`)
    process.exit(2)
  }
}

const stats = new Stats()
const counts = {
  snapshotsCreated: 0,
  snapshotsRemoved: 0,
  removesForced: 0,
  mergesStarted: 0,
  mergesDone: 0,
  mergesForced: 0,
  emptyMerges: 0,
  cliCommands: 0,
  /** Refusals checked: remove/merge of a snapshot open over NBD, a snapshot during a merge. */
  refusalsChecked: 0,
  busyRetries: 0,
  viewsVerified: 0,
}
let stopping = false
/** Stopped on the way out whatever happens, so no server outlives the soak. */
let serverProcess: ServeProcess | null = null
const laneContext = { stats, stopped: () => stopping }

function log(message: string): void {
  process.stderr.write(`soak: ${message}\n`)
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

function cli(argv: string[]): Promise<{ code: number; stderr: string }> {
  counts.cliCommands++
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...argv], { cwd: REPO, maxBuffer: 512 * MiB, encoding: 'buffer' }, (err, _stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0
      resolve({ code, stderr: stderr.toString('utf8') })
    })
  })
}

async function cliOk(argv: string[]): Promise<void> {
  const r = await cli(argv)
  if (r.code !== 0) throw new Error(`blocksnap ${argv.join(' ')} exited ${r.code}: ${r.stderr.trim()}`)
}

function rssBytes(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  const match = /VmRSS:\s+(\d+) kB/.exec(status)
  return match ? Number(match[1]) * 1024 : 0
}

function mib(bytes: number): string {
  return `${(bytes / MiB).toFixed(1)} MiB`
}

async function main(): Promise<number> {
  const work = await mkdtemp(join(tmpdir(), 'blocksnap-soak-'))
  const volDir = join(work, 'vol')
  const volName = basename(volDir)
  const admin = new Random(streamSeed(seed, 'admin'))
  log(`seed ${seed}: ${minutes} min, ${connections} origin connections x ${depth} requests, ${mib(sizeBytes)} volume in ${work}`)

  await cliOk(['create', volDir, '--size', String(sizeBytes)])
  const port = await freePort()
  // Room for every connection the soak opens, plus those of snapshots just closed or withdrawn.
  const maxConnections = connections + 2 * SNAPSHOT_CONNECTIONS * MAX_SNAPSHOTS
  const server = await ServeProcess.start([volDir, '--listen', `127.0.0.1:${port}`, '--max-connections', String(maxConnections)])
  serverProcess = server
  const pid = server.pid as number
  const control = await ControlClient.connect(volDir)
  if (!control) throw new Error('no control socket after serve started')

  let laneCount = 0
  const openClients = async (view: View, n: number) => {
    for (let i = 0; i < n; i++) {
      const client = await NbdClient.open(port, view.exportName)
      if (client.sizeBytes !== view.sizeBytes) stats.error(`${view.exportName}: export size ${client.sizeBytes}, want ${view.sizeBytes}`)
      if (!(client.transmissionFlags & TransmissionFlags.CAN_MULTI_CONN)) stats.error(`${view.exportName}: CAN_MULTI_CONN not advertised`)
      view.clients.push(client)
      for (let d = 0; d < depth; d++) {
        const rng = new Random(streamSeed(seed, `lane${laneCount++}`))
        view.lanes.push(runLane(view, client, rng, laneContext))
      }
    }
  }
  const closeClients = async (view: View) => {
    await Promise.all(view.clients.map((c) => (view.state === 'live' ? c.disconnect() : (c.destroy(), c.closed))))
  }

  const origin = new View(volName, null, new Uint8Array(sizeBytes))
  await openClients(origin, connections)
  const snapshots = new Map<string, View>()
  let merging: { name: string; viaCli: Promise<{ code: number; stderr: string }> | null } | null = null
  let snapSeq = 0

  // ------------------------------------------------------------------ RSS and hang watch
  const startedAt = Date.now()
  const endAt = startedAt + minutes * 60_000
  // Warm: a tenth of the run, at least 20 s (caches, pools and V8's heap have grown by then).
  const warmAt = startedAt + Math.min(Math.max(minutes * 6_000, 20_000), minutes * 30_000)
  let rssStart: number | null = null
  let rssPeak = 0
  let hung = false
  const sampler = setInterval(() => {
    try {
      const rss = rssBytes(pid)
      rssPeak = Math.max(rssPeak, rss)
      if (rssStart === null && Date.now() >= warmAt) {
        rssStart = rss
        log(`RSS after warm-up: ${mib(rss)}`)
      }
    } catch {
      // the server is gone; the exit check reports it
    }
    if (!stopping && Date.now() - stats.lastProgressMs > HANG_MS) {
      stats.error(`no request answered for ${HANG_MS / 1000} s: the server hangs`)
      hung = true
      stopping = true
    }
    if (stats.errors.length >= 20) stopping = true
  }, 1000)
  const rssNow = () => {
    try {
      return rssBytes(pid)
    } catch {
      return 0
    }
  }
  const progress = setInterval(() => {
    const elapsed = Math.round((Date.now() - startedAt) / 1000)
    log(
      `${elapsed}s: ${stats.totalRequests} requests, ${counts.snapshotsCreated} snapshots created, ${counts.snapshotsRemoved} removed, ` +
        `${counts.mergesDone} merges, ${counts.viewsVerified} views verified, ${stats.errors.length} errors, server RSS ${mib(rssNow())}`,
    )
  }, 30_000)

  // ------------------------------------------------------------------ snapshot operations
  /** Runs `op`, retrying while the server still counts connections we have just closed. */
  const unlessBusy = async (op: () => Promise<unknown>) => {
    for (let attempt = 0; ; attempt++) {
      try {
        return await op()
      } catch (err) {
        if (attempt < 100 && isSnapError(err, 'SNAP_BUSY') && /NBD client/.test((err as Error).message)) {
          counts.busyRetries++
          await sleep(20)
          continue
        }
        throw err
      }
    }
  }

  /** Remove or merge without --force while clients have it open: the server must refuse. */
  const checkRefusal = async (view: View, op: 'remove' | 'merge') => {
    const name = view.snapshot as string
    try {
      if (op === 'remove') await control.remove(name)
      else await control.call('merge', { name, force: false })
      stats.error(`${op} ${view.exportName} with ${view.clients.length} NBD clients open was not refused`)
    } catch (err) {
      if (isSnapError(err, 'SNAP_BUSY') && /NBD client/.test((err as Error).message)) counts.refusalsChecked++
      else stats.error(`${op} ${view.exportName} with clients open: want SNAP_BUSY naming the clients, got ${(err as Error).message}`)
    }
  }

  const createSnapshot = async (thenMerge: boolean): Promise<void> => {
    const name = `s${++snapSeq}`
    const transient = !thenMerge && admin.chance(0.1)
    const chunkBytes = admin.pick([4096, 4096, 16384, 65536])
    const viaCli = admin.chance(0.15)
    // The snapshot's point in time must be known exactly: no origin write in flight across it.
    await (thenMerge ? origin.pauseAll() : origin.pauseWrites())
    let view: View | null = null
    try {
      try {
        if (viaCli) {
          await cliOk(['snapshot', `${volDir}@${name}`, '--chunk-size', String(chunkBytes), ...(transient ? ['--store', 'transient'] : [])])
        } else {
          await control.snapshot(name, { chunkSizeBytes: chunkBytes, ...(transient ? { store: 'transient' } : {}) })
        }
      } catch (err) {
        // As LVM, no snapshot of an origin being merged; the merge may have ended meanwhile.
        if (merging !== null && /while a merge is in progress/.test((err as Error).message)) {
          counts.refusalsChecked++
          return
        }
        throw err
      }
      view = new View(`${volName}@${name}`, name, origin.model.slice(), transient)
      counts.snapshotsCreated++
      if (thenMerge) {
        // Merged before anything is copied into it: the merge must end at once.
        await control.call('merge', { name })
        counts.mergesStarted++
        counts.emptyMerges++
        merging = { name, viaCli: null }
      }
    } finally {
      origin.resume()
    }
    if (view !== null && !thenMerge) {
      snapshots.set(name, view)
      await openClients(view, SNAPSHOT_CONNECTIONS)
    }
  }

  /** Forced: the clients keep running and must get ESHUTDOWN afterwards. */
  const withdrawForced = async (view: View) => {
    view.state = 'withdrawn'
    view.resume()
    await Promise.all(view.lanes)
    await closeClients(view)
  }

  const removeSnapshot = async (view: View) => {
    await scans.get(view)
    const name = view.snapshot as string
    // A quarter forced, and the second remove at the latest, so short runs see it too.
    const force = admin.chance(0.25) || (counts.removesForced === 0 && counts.snapshotsRemoved >= 1)
    const viaCli = admin.chance(0.15)
    const remove = () => (viaCli ? cliOk(['remove', `${volDir}@${name}`, ...(force ? ['--force'] : [])]) : control.remove(name, { force }))
    if (force) {
      view.state = 'forcing'
      await remove()
      await withdrawForced(view)
      counts.removesForced++
    } else {
      if (admin.chance(0.3)) await checkRefusal(view, 'remove')
      await view.stopLanes()
      await closeClients(view)
      await unlessBusy(remove)
    }
    snapshots.delete(name)
    counts.snapshotsRemoved++
  }

  const mergeSnapshot = async (view: View) => {
    await scans.get(view)
    const name = view.snapshot as string
    const force = admin.chance(0.25) || (counts.mergesForced === 0 && counts.mergesStarted >= 1)
    const viaCli = admin.chance(0.2)
    if (force) {
      await view.pauseWrites() // its model must be final when the merge takes it
      view.state = 'forcing'
    } else {
      if (admin.chance(0.3)) await checkRefusal(view, 'merge')
      await view.stopLanes()
      await closeClients(view)
    }
    // Nothing in flight on the origin across the switch to the merged view.
    await origin.pauseAll()
    try {
      let cliRun: Promise<{ code: number; stderr: string }> | null = null
      if (viaCli) {
        cliRun = cli(['merge', `${volDir}@${name}`, '--wait', ...(force ? ['--force'] : [])])
        // The merge has begun once the server reports it (or has already finished it).
        for (;;) {
          const s = await control.call<{ state: string; snapshot?: string }>('merge-status')
          if (s.snapshot === name) break
          const info = await control.list()
          if (!info.snapshots.some((x) => x.name === name)) break
          const early = await Promise.race([cliRun, sleep(50).then(() => null)])
          if (early !== null) throw new Error(`blocksnap merge ${name} exited ${early.code} before the merge began: ${early.stderr.trim()}`)
        }
      } else {
        await unlessBusy(() => control.call('merge', { name, force }))
      }
      origin.model = view.model.slice()
      merging = { name, viaCli: cliRun }
      counts.mergesStarted++
      if (force) counts.mergesForced++
    } finally {
      origin.resume()
    }
    if (force) await withdrawForced(view)
    snapshots.delete(name)
  }

  const pollMerge = async () => {
    if (merging === null) return
    const m = merging
    const s = await control.call<{ state: string; snapshot?: string; failure?: string | null }>('merge-status')
    if (s.state === 'failed' || s.state === 'stopped') {
      stats.error(`merge of ${m.name}: ${s.state} (${s.failure ?? ''})`)
      merging = null
      return
    }
    if (s.snapshot === m.name && s.state !== 'complete') return
    merging = null
    if (m.viaCli) {
      const r = await m.viaCli
      if (r.code !== 0) stats.error(`blocksnap merge ${m.name} --wait exited ${r.code}: ${r.stderr.trim()}`)
    }
    const info: VolumeInfo = await control.list()
    if (info.snapshots.some((x) => x.name === m.name)) stats.error(`merged snapshot ${m.name} is still listed`)
    if (info.merge !== null) stats.error(`merge of ${m.name} done, but list shows a merge of ${info.merge.snapshot}`)
    counts.mergesDone++
  }

  /** Scans run beside the other operations; a snapshot's is awaited before it goes away. */
  const scans = new Map<View, Promise<void>>()
  const scan = (view: View): Promise<void> => {
    const client = view.clients[0]
    const running = scans.get(view)
    if (running) return running
    if (!client) return Promise.resolve()
    const done = scanView(view, client, stats).then((clean) => {
      if (clean) counts.viewsVerified++
      scans.delete(view)
    })
    scans.set(view, done)
    return done
  }

  // ------------------------------------------------------------------ the admin loop
  const pickSnapshot = (filter: (v: View) => boolean): View | null => {
    const candidates = [...snapshots.values()].filter(filter)
    return candidates.length === 0 ? null : admin.pick(candidates)
  }
  try {
    while (Date.now() < endAt && !stopping) {
      await sleep(100 + admin.int(700))
      await pollMerge()
      const x = admin.int(100)
      const t0 = Date.now()
      let what = 'nothing'
      if (snapshots.size === 0 || (x < 30 && snapshots.size < MAX_SNAPSHOTS)) {
        what = 'create'
        await createSnapshot(merging === null && admin.chance(0.1))
      } else if (x < 50) {
        what = 'remove'
        const v = pickSnapshot(() => true)
        if (v) await removeSnapshot(v)
      } else if (x < 75) {
        what = 'merge'
        const v = merging === null ? pickSnapshot((s) => !s.transient) : null
        if (v) await mergeSnapshot(v)
      } else {
        what = 'scan'
        void scan(admin.chance(0.4) ? origin : (pickSnapshot(() => true) ?? origin))
      }
      if (process.env.SOAK_TRACE) log(`${what}: ${Date.now() - t0} ms`)
    }
  } catch (err) {
    stats.error(`snapshot operation failed: ${(err as Error).message}`)
  }

  // ------------------------------------------------------------------ the end
  stopping = true
  clearInterval(progress)
  const views = [origin, ...snapshots.values()]
  await Promise.all(views.flatMap((v) => v.lanes))
  await Promise.all(scans.values())
  for (let waited = 0; merging !== null && waited < 600 && !hung; waited++) {
    await pollMerge()
    if (merging !== null) await sleep(500)
  }
  if (merging !== null) stats.error(`merge of ${(merging as { name: string }).name} did not end`)
  if (!hung) {
    for (const v of views) await scan(v)
    const info = await control.list()
    const listed = info.snapshots.map((s) => s.name).sort()
    const expected = [...snapshots.keys()].sort()
    if (listed.join() !== expected.join()) stats.error(`list shows snapshots [${listed.join(', ')}], want [${expected.join(', ')}]`)
  }
  clearInterval(sampler)
  const rssEnd = rssBytes(pid)
  rssPeak = Math.max(rssPeak, rssEnd)
  for (const v of views) await closeClients(v)
  control.close()

  server.child.kill('SIGTERM')
  const exit = await server.exit
  await server.closed
  if (exit.code !== 0) stats.error(`blocksnap serve exited ${JSON.stringify(exit)} after SIGTERM`)
  const problems = server.log
    .split('\n')
    .filter((line) => /"level":(50|60)/.test(line))
    .map((line) => (JSON.parse(line) as { msg: string }).msg)
  for (const p of problems.slice(0, 10)) stats.error(`server logged an error: ${p}`)

  // Offline: what the server left on disk reads exactly as the models say.
  if (!hung && exit.code === 0) {
    const check = await cli(['check', volDir])
    if (check.code !== 0) stats.error(`blocksnap check after the soak exited ${check.code}: ${check.stderr.trim()}`)
    for (const v of [origin, ...[...snapshots.values()].filter((s) => !s.transient)]) {
      const device = v.snapshot === null ? volDir : `${volDir}@${v.snapshot}`
      const file = join(work, 'readback')
      await cliOk(['read', device, '--output', file])
      const data = await readFile(file)
      if (Buffer.compare(data, v.model) !== 0) stats.error(`offline read of ${v.exportName} after the server stopped differs from its model`)
      else counts.viewsVerified++
    }
  }

  // ------------------------------------------------------------------ summary
  const seconds = (Date.now() - startedAt) / 1000
  const growth = rssStart === null ? null : rssEnd - rssStart
  const lines = [
    `seed ${seed}, ${seconds.toFixed(0)} s, ${connections} origin connections x ${depth} + ${SNAPSHOT_CONNECTIONS} per snapshot`,
    `requests: ${stats.totalRequests} (${(Object.keys(stats.requests) as (keyof typeof stats.requests)[])
      .map((k) => `${k} ${stats.requests[k]} / ${mib(stats.bytes[k])}`)
      .join(', ')})`,
    `reads verified against the model: ${stats.readsVerified}; whole views verified: ${counts.viewsVerified}`,
    `snapshots created ${counts.snapshotsCreated}, removed ${counts.snapshotsRemoved} (${counts.removesForced} with --force)`,
    `merges started ${counts.mergesStarted}, done ${counts.mergesDone} (${counts.mergesForced} with --force, ${counts.emptyMerges} of untouched snapshots)`,
    `ESHUTDOWN after --force (expected): ${stats.expectedShutdowns}; refusals checked (open snapshot, snapshot during merge): ${counts.refusalsChecked}; ` +
      `busy retries: ${counts.busyRetries}; CLI commands: ${counts.cliCommands}`,
    `server RSS: ${rssStart === null ? 'not warm yet' : mib(rssStart)} after warm-up, ${mib(rssEnd)} at the end, ${mib(rssPeak)} peak` +
      (growth === null ? '' : ` (growth ${mib(growth)}, limit ${mib(RSS_GROWTH_LIMIT_BYTES)})`),
    `errors: ${stats.errors.length}`,
  ]
  process.stdout.write(`${lines.map((l) => `soak: ${l}`).join('\n')}\n`)
  let failed = stats.errors.length > 0
  if (growth !== null && growth >= RSS_GROWTH_LIMIT_BYTES) {
    process.stdout.write(`soak: FAIL: server RSS grew by ${mib(growth)}\n`)
    failed = true
  }
  if (failed) {
    process.stdout.write(`soak: FAIL (replay with --seed ${seed}); volume kept in ${work}\n`)
    await import('node:fs/promises').then((fs) => fs.writeFile(join(work, 'server.log'), server.log))
    return 1
  }
  if (!args.keep) await rm(work, { recursive: true, force: true })
  process.stdout.write('soak: PASS\n')
  return 0
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`soak: error: ${(err as Error).stack ?? err}\n`)
    if (serverProcess?.alive()) serverProcess.child.kill('SIGTERM')
    process.exit(1)
  },
)
