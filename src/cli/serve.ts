/**
 * `blocksnap serve`: owns the volumes, exports them over NBD, and carries out other blocksnap
 * commands live through each volume's control socket. SIGINT/SIGTERM stop it cleanly: clients
 * are drained, everything is flushed and committed, locks are released.
 */
import { pino } from 'pino'
import { ControlServer } from '../control/control-server.js'
import { SnapError, isSnapError } from '../errors.js'
import { NbdServer } from '../nbd/server.js'
import { createTlsContext, loadTlsFiles, type NbdTlsFiles, type NbdTlsOptions } from '../nbd/tls.js'
import { Volume } from '../volume/volume.js'
import { VolumeExports } from './volume-exports.js'

export interface ServeOptions {
  readonly host: string
  readonly port: number
  readonly socket?: string
  readonly readOnly: boolean
  readonly tlsPsk?: string
  readonly tlsCert?: string
  readonly tlsKey?: string
  readonly tls?: 'off' | 'allow' | 'require'
  readonly writeBackBytes?: number
  readonly handshakeTimeoutMs?: number
  readonly maxConnections?: number
  readonly maxPendingBytes?: number
}

function mergeHandlers(volume: Volume) {
  return {
    merge: async (a: Record<string, unknown>) => {
      const rate = a.rate as number | undefined
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
  }
  try {
    const tls = await loadTlsFiles(files)
    createTlsContext(tls) // validates the material (PEM, key pair) now
    return tls
  } catch (err) {
    throw isSnapError(err) ? err : new SnapError('SNAP_BAD_ARGUMENT', `TLS: ${(err as Error).message}`)
  }
}

export async function serveVolumes(paths: string[], options: ServeOptions, extra: { printHelp?: boolean } = {}): Promise<void> {
  const log = pino({ name: 'blocksnap', level: process.env.BLOCKSNAP_LOG_LEVEL ?? 'info' }, pino.destination(2))
  const tls = await loadServeTls(options)
  const names = new Set<string>()
  const volumes: Volume[] = []
  const controls: ControlServer[] = []
  const cleanup = async () => {
    for (const c of controls) await c.close().catch(() => {})
    for (const v of volumes) await v.close().catch((err) => log.error(`closing ${v.name}: ${(err as Error).message}`))
  }
  try {
    for (const p of paths) {
      const volume = await Volume.open(p, options.writeBackBytes === undefined ? {} : { writeBackBytes: options.writeBackBytes })
      volumes.push(volume)
      if (names.has(volume.name)) throw new SnapError('SNAP_EXISTS', `two volumes are named ${volume.name}`)
      names.add(volume.name)
      const control = new ControlServer(volume, mergeHandlers(volume))
      await control.listen()
      controls.push(control)
    }
  } catch (err) {
    await cleanup()
    throw err
  }
  const server = new NbdServer({
    exports: new VolumeExports(volumes, { readOnly: options.readOnly }),
    logger: log.child({ component: 'nbd' }),
    ...(tls ? { tls } : {}),
    ...(options.handshakeTimeoutMs === undefined ? {} : { handshakeTimeoutMs: options.handshakeTimeoutMs }),
    ...(options.maxConnections === undefined ? {} : { maxConnections: options.maxConnections }),
    ...(options.maxPendingBytes === undefined ? {} : { maxPendingBytes: options.maxPendingBytes }),
  })
  let listening = `${options.host}:${options.port}`
  try {
    await server.listen({ host: options.host, port: options.port })
    if (options.socket) {
      listening = options.socket
      await server.listen({ path: options.socket })
    }
  } catch (err) {
    await server.close().catch(() => {})
    await cleanup()
    throw new SnapError('SNAP_BUSY', `cannot listen on ${listening}: ${(err as Error).message}`)
  }
  const where = `${options.host}:${options.port}`
  log.info(`serving ${volumes.map((v) => v.name).join(', ')} on ${where}${options.socket ? ` and ${options.socket}` : ''}`)
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
  await new Promise<void>((resolve) => {
    let stopping = false
    const stop = (signal: string) => {
      if (stopping) return
      stopping = true
      log.info(`${signal}: stopping`)
      void (async () => {
        await server.close().catch((err) => log.error(`closing NBD server: ${(err as Error).message}`))
        await cleanup()
        resolve()
      })()
    }
    process.once('SIGINT', () => stop('SIGINT'))
    process.once('SIGTERM', () => stop('SIGTERM'))
  })
}
