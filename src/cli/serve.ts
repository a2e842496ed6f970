/**
 * `blocksnap serve`: owns the volumes, exports them over NBD, and carries out other blocksnap
 * commands live through each volume's control socket. SIGINT, SIGQUIT and SIGTERM stop it
 * cleanly: clients are drained, everything is flushed and committed, locks are released and
 * sockets removed. SIGHUP does too when logging to stderr (the terminal went away); with
 * `--log-file` it reopens the log file instead. Under systemd it serves on the sockets passed
 * by socket activation and reports readiness (src/cli/systemd.ts).
 */
import { keepServingWhenOutputCloses } from './closed-output.js'
import type { Logger } from 'pino'
import { ControlServer } from '../control/control-server.js'
import { type DeviceUsers, refuseIfOpen } from '../control/volume-ops.js'
import { SnapError, isSnapError } from '../errors.js'
import { NbdServer } from '../nbd/server.js'
import { createTlsContext, loadTlsFiles, type NbdTlsFiles, type NbdTlsOptions } from '../nbd/tls.js'
import { UnixSocketAddress, clearStaleSocket } from '../util/unix-socket.js'
import { Volume } from '../volume/volume.js'
import { VolumeExports } from './volume-exports.js'
import type { ServiceMetrics } from '../service/metrics.js'
import type { ServiceHttpServer } from '../service/service-http.js'
import { EventHook } from './event-hook.js'
import { type ServiceEvent, clientErrorEvent, logServiceEvent } from './service-events.js'
import { PidFile } from './pid-file.js'
import { exitCodeFor } from './exit-codes.js'
import { openServeLog, reopenOnHangup } from './serve-log.js'
import { notifyReady, takePassedSockets } from './systemd.js'

export interface ServeOptions {
  readonly host: string
  readonly port: number
  readonly socket?: string
  readonly readOnly: boolean
  readonly tlsPsk?: string
  readonly tlsCert?: string
  readonly tlsKey?: string
  /** CA for client certificates; verifying them is on by default with a CA. */
  readonly tlsCa?: string
  readonly tlsVerifyPeer?: boolean
  readonly tls?: 'off' | 'allow' | 'require'
  readonly writeBackBytes?: number
  readonly handshakeTimeoutMs?: number
  readonly maxConnections?: number
  readonly maxPendingBytes?: number
  /** Serve Prometheus metrics and the status page on this address (HTTP). */
  readonly metrics?: { readonly host: string; readonly port: number }
  /** Run through `sh -c` for every event, the event as JSON on stdin. */
  readonly onEvent?: string
  /** Written once serving, removed on a clean stop. */
  readonly pidFile?: string
  /** Log here instead of stderr; SIGHUP reopens it. */
  readonly logFile?: string
  /** Lease period of volumes on a shared store (RBD origin); renewed every third of it. */
  readonly leaseSeconds?: number
  /** Take leased volumes over from a live owner, fencing it first (`--takeover`). */
  readonly takeover?: boolean
}

/**
 * A lease taken over by another host: this process was fenced (its writes fail on the OSDs) and
 * must stop at once. Nothing is flushed or closed: a manifest write or a last flush would be the
 * stale owner's late write. Clients see their connections drop; the gateways die with us.
 */
function leaseLost(err: SnapError, log: Logger): never {
  log.fatal({ code: err.code }, err.message)
  process.stderr.write(`blocksnap: error [${err.code}]: ${err.message}\n`)
  process.exit(exitCodeFor(err.code))
}

/** How long a stopping server lets the --on-event hook work through its queue. */
const HOOK_DRAIN_MS = 5000

function mergeHandlers(volume: Volume, users: DeviceUsers) {
  return {
    merge: async (a: Record<string, unknown>) => {
      const rate = a.rate as number | undefined
      if (volume.merge?.snapshot.snapshotName !== a.name) refuseIfOpen(volume, a.name as string, users, a.force === true)
      const merge = await volume.startMerge(a.name as string, rate === undefined ? {} : { rateBytesPerSecond: rate })
      return { state: merge.state, ...merge.progress() }
    },
    'merge-status': async () => {
      const merge = volume.merge
      if (!merge) return { state: volume.pendingMerge ? 'pending' : 'none' }
      const failure = merge.state === 'failed' ? merge.snapshot.statusText() : null
      return { state: merge.state, snapshot: merge.snapshot.snapshotName, ...merge.progress(), failure }
    },
  }
}

/**
 * Reads and checks the TLS files before any volume is opened, so a bad key file is reported as
 * such (not as a listen failure). `--tls allow|require` without key material is refused: it
 * would otherwise serve plaintext.
 */
async function loadServeTls(options: ServeOptions): Promise<NbdTlsOptions | undefined> {
  if (!options.tlsPsk && !options.tlsCert) {
    if (options.tls === 'allow' || options.tls === 'require') {
      throw new SnapError('SNAP_BAD_ARGUMENT', `--tls ${options.tls} needs --tls-psk or --tls-cert/--tls-key`)
    }
    return undefined
  }
  const files: NbdTlsFiles = {
    mode: options.tls ?? 'require',
    ...(options.tlsPsk ? { pskFile: options.tlsPsk } : {}),
    ...(options.tlsCert ? { certFile: options.tlsCert } : {}),
    ...(options.tlsKey ? { keyFile: options.tlsKey } : {}),
    ...(options.tlsCa ? { caFile: options.tlsCa } : {}),
    ...(options.tlsVerifyPeer === undefined ? {} : { verifyPeer: options.tlsVerifyPeer }),
  }
  try {
    const tls = await loadTlsFiles(files)
    createTlsContext(tls) // validates the material (PEM, key pair) now
    return tls
  } catch (err) {
    throw isSnapError(err) ? err : new SnapError('SNAP_BAD_ARGUMENT', `TLS: ${(err as Error).message}`)
  }
}

/** Starts the metrics and status page listener; a busy address fails `serve` like the NBD one. */
async function listenService(metrics: ServiceMetrics, at: { host: string; port: number }, log: Logger): Promise<ServiceHttpServer> {
  const { ServiceHttpServer } = await import('../service/service-http.js')
  const http = new ServiceHttpServer(metrics, log.child({ component: 'metrics' }))
  let bound: { host: string; port: number }
  try {
    bound = await http.listen(at.host, at.port)
  } catch (err) {
    throw new SnapError('SNAP_BUSY', `cannot listen on ${at.host.includes(':') ? `[${at.host}]` : at.host}:${at.port} for --metrics: ${(err as Error).message}`)
  }
  const url = `http://${bound.host.includes(':') ? `[${bound.host}]` : bound.host}:${bound.port}/`
  log.info(`status page on ${url}, Prometheus metrics on ${url}metrics`)
  return http
}

/**
 * Every signal that asks a daemon to stop; nbdkit treats them alike too. SIGHUP is among them only
 * while logging to stderr: with a log file it means "reopen the log" (logrotate).
 */
const STOP_SIGNALS: readonly NodeJS.Signals[] = ['SIGHUP', 'SIGINT', 'SIGQUIT', 'SIGTERM']

/**
 * Watches the stop signals for the whole life of the server, startup included. The first one
 * starts the shutdown; any later one is logged and ignored, so a second Ctrl-C cannot cut the
 * drain and flush short. The handlers stay installed until the process exits (signal handlers
 * do not keep Node alive), so a signal during the last steps of exit does no harm either.
 */
class StopSignals {
  /** Resolves with the name of the first stop signal. */
  readonly received: Promise<NodeJS.Signals>
  private first: NodeJS.Signals | null = null

  constructor(log: { info(msg: string): void; warn(msg: string): void }, signals: readonly NodeJS.Signals[]) {
    let resolve!: (signal: NodeJS.Signals) => void
    this.received = new Promise((r) => {
      resolve = r
    })
    for (const signal of signals) {
      process.on(signal, () => {
        if (this.first !== null) {
          log.warn(`${signal}: already stopping after ${this.first}; ignored`)
          return
        }
        this.first = signal
        log.info(`${signal}: stopping`)
        resolve(signal)
      })
    }
  }
}

export async function serveVolumes(paths: string[], options: ServeOptions, extra: { printHelp?: boolean } = {}): Promise<void> {
  keepServingWhenOutputCloses()
  const serveLog = openServeLog(options.logFile)
  const log = serveLog.log
  const signals = new StopSignals(log, serveLog.file === null ? STOP_SIGNALS : STOP_SIGNALS.filter((s) => s !== 'SIGHUP'))
  if (serveLog.file !== null) reopenOnHangup(serveLog)
  // Taken (and cleared from the environment) now, before anything is spawned.
  const passedSockets = takePassedSockets()
  const tls = await loadServeTls(options)
  const hook = options.onEvent === undefined ? null : new EventHook(options.onEvent, log)
  // Every event: one structured log record, then the hook (queued, never waited for).
  const report = (event: ServiceEvent) => {
    logServiceEvent(log, event)
    hook?.push(event)
  }
  const names = new Set<string>()
  const volumes: Volume[] = []
  // Control requests can arrive before the NBD server exists; nobody is connected then.
  let nbd: NbdServer | null = null
  const users: DeviceUsers = { clientsOf: (name) => nbd?.clientsOf(name) ?? 0 }
  const controls: ControlServer[] = []
  const cleanup = async () => {
    for (const c of controls) await c.close().catch(() => {})
    for (const v of volumes) await v.close().catch((err) => log.error(`closing ${v.name}: ${(err as Error).message}`))
    await hook?.close(HOOK_DRAIN_MS)
  }
  try {
    for (const p of paths) {
      const volume = await Volume.open(p, {
        ...(options.writeBackBytes === undefined ? {} : { writeBackBytes: options.writeBackBytes }),
        ownership: {
          ...(options.leaseSeconds === undefined ? {} : { leaseSeconds: options.leaseSeconds }),
          takeover: options.takeover === true,
          onLost: (err) => leaseLost(err, log),
          onNotice: (message) => log.warn(message),
        },
      })
      volumes.push(volume)
      volume.onEvent(report)
      // Snapshots already past a warning level are said once at start.
      volume.reportFill()
      if (names.has(volume.name)) throw new SnapError('SNAP_EXISTS', `two volumes are named ${volume.name}`)
      names.add(volume.name)
      for (const r of volume.records) {
        const broken = volume.broken(r.name)
        if (broken !== null) log.warn(`${volume.name}@${r.name} is broken (${broken}): serving the rest; origin writes are refused with EPERM until it is repaired or removed with \`blocksnap remove ${volume.name}@${r.name} --force\``)
      }
      if (volume.pendingMerge !== null && volume.merge === null) {
        log.warn(`${volume.name}: the merge of ${volume.name}@${volume.pendingMerge} waits for the broken snapshots; origin reads fail (EIO) until then`)
      }
      const control = new ControlServer(volume, mergeHandlers(volume, users), { readOnly: options.readOnly, users, replaceLive: volume.ownedBy === 'lease' })
      await control.listen()
      controls.push(control)
      // Serving is asking for it: a merge interrupted earlier goes on, at the user's rate.
      const resumed = await volume.resumeMerge()
      if (resumed) {
        const rate = volume.pendingMergeRate
        log.info(`${volume.name}: resuming the merge of ${resumed.snapshot.snapshotName}${rate === null ? '' : ` at ${rate} bytes/s`}`)
      }
    }
  } catch (err) {
    await cleanup()
    throw err
  }
  const exports = new VolumeExports(volumes, { readOnly: options.readOnly })
  const metrics = options.metrics
    ? new (await import('../service/metrics.js')).ServiceMetrics({
        volumes,
        exportNames: () => exports.list().map((e) => e.name),
        clientsOf: (name) => nbd?.clientsOf(name) ?? 0,
      })
    : null
  const server: NbdServer = new NbdServer({
    exports,
    ...(metrics ? { requestObserver: metrics.requestObserver } : {}),
    logger: log.child({ component: 'nbd' }),
    ...(tls ? { tls } : {}),
    ...(options.handshakeTimeoutMs === undefined ? {} : { handshakeTimeoutMs: options.handshakeTimeoutMs }),
    ...(options.maxConnections === undefined ? {} : { maxConnections: options.maxConnections }),
    ...(options.maxPendingBytes === undefined ? {} : { maxPendingBytes: options.maxPendingBytes }),
    onClientFault: (fault) => report(clientErrorEvent(fault)),
  })
  nbd = server
  let listening = `${options.host}:${options.port}`
  let socketAddress: UnixSocketAddress | null = null
  let http: ServiceHttpServer | null = null
  let pidFile: PidFile | null = null
  try {
    if (passedSockets.length > 0) {
      // Socket activation: systemd's sockets replace --listen and --socket.
      for (const passed of passedSockets) {
        listening = `${passed.name} (fd ${passed.fd}, passed by systemd)`
        await server.listen(passed)
      }
    } else {
      await server.listen({ host: options.host, port: options.port })
    }
    if (options.socket && passedSockets.length === 0) {
      listening = options.socket
      // A server killed outright leaves its socket file behind; qemu-nbd and nbdkit reuse the path too.
      await clearStaleSocket(options.socket, 'socket')
      socketAddress = await UnixSocketAddress.of(options.socket)
      await server.listen({ path: socketAddress.bindPath })
    }
    if (metrics && options.metrics) http = await listenService(metrics, options.metrics, log)
    if (options.pidFile !== undefined) pidFile = await PidFile.write(options.pidFile)
  } catch (err) {
    await http?.close()
    await server.close().catch(() => {})
    await socketAddress?.release()
    await cleanup()
    throw isSnapError(err) ? err : new SnapError('SNAP_BUSY', `cannot listen on ${listening}: ${(err as Error).message}`)
  }
  const where = `${options.host}:${options.port}`
  const served = volumes.map((v) => v.name).join(', ')
  if (passedSockets.length > 0) {
    const sockets = passedSockets.map((p) => `${p.name} (fd ${p.fd})`).join(', ')
    log.info(`serving ${served} on the sockets systemd passed: ${sockets}; --listen and --socket are not used`)
  } else {
    log.info(`serving ${served} on ${where}${options.socket ? ` and ${options.socket}` : ''}`)
  }
  await notifyReady(`serving ${served}`, log)
  if (extra.printHelp) {
    const v = volumes[0] as Volume
    const uri = `nbd://${where}/${v.name}`
    process.stderr.write(
      [
        '',
        `blocksnap is serving volume '${v.name}' (${v.sizeBytes} bytes) from ${v.dir}`,
        '',
        'Connect:',
        `  nbdinfo ${uri}`,
        `  qemu-img info ${uri}`,
        `  qemu-system-x86_64 -drive file=${uri},format=raw,if=virtio ...`,
        `  sudo nbd-client ${options.host} ${options.port} /dev/nbd0 -N ${v.name}`,
        '',
        'Snapshot it live, read the snapshot, merge it back:',
        `  bin/blocksnap snapshot ${v.dir}@snap1`,
        `  nbdinfo nbd://${where}/${v.name}@snap1`,
        `  bin/blocksnap list ${v.dir}`,
        `  bin/blocksnap merge ${v.dir}@snap1 --wait`,
        '',
        'Stop with Ctrl-C.',
        '',
      ].join('\n'),
    )
  }
  await signals.received
  await http?.close() // first: a scrape reads the volumes
  await server.close().catch((err) => log.error(`closing NBD server: ${(err as Error).message}`))
  await socketAddress?.release() // after the close: libuv removes the socket file by its bound name
  await cleanup()
  await pidFile?.remove()
  log.info('stopped')
}
