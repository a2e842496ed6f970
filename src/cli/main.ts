/**
 * blocksnap command line: parse, pick local or live execution, render, map errors to exit codes.
 * A command on a volume that `blocksnap serve` owns is sent over the volume's control socket and
 * carried out by the server; otherwise the command opens the volume itself.
 */
import { readFile, mkdir, stat } from 'node:fs/promises'
import { resolve } from 'node:path'
import { Argument, Command, Option } from 'commander'
import { SnapError } from '../errors.js'
import { keepFreedHeapMapped } from '../util/heap-trim.js'
import { watchClosedOutput } from './closed-output.js'
import type { VolumeOps } from '../control/volume-ops.js'
import type { SnapshotInfo, VolumeInfo } from '../volume/volume.js'
import { EXIT_DAMAGE, EXIT_OK } from './exit-codes.js'
import { brokenWarnings, formatList, snapshotWarnings } from './output.js'
import { writeOutputFile } from './output-file.js'
import { mergeCommand } from './merge-command.js'
import { VERSION } from './version.js'
import { mapDumpCommands } from './map-dump-commands.js'
import { backupCommands } from './backup-commands.js'
import { type SizeOrShare, chunkArg, intArg, positiveArg, positiveSizeArg, sizeArg, sizeOrShareArg } from './args.js'
import { UsageError, isHelpOrVersion, printJson, reportError, wantsJson } from './render.js'
import { addExamples } from './help-examples.js'

// The engine, the control client and the server (pino, NBD, TLS) are imported by the commands
// that use them rather than here: a command pays only for what it runs, and `--version`, `--help`
// and usage errors load little more than commander (start-up is measured by `npm run bench`).
const volumeModule = () => import('../volume/volume.js')
const controlClientModule = () => import('../control/control-client.js')

function percentArg(flag: string, min: number, max: number) {
  return (text: string): number => {
    const n = /^\d+$/.test(text) ? Number(text) : Number.NaN
    if (!(n >= min && n <= max)) throw new UsageError(`invalid ${flag} '${text}' (a whole percentage from ${min} to ${max})`)
    return n
  }
}

/** Runs `fn` on the volume: live through its server if it is served, else by opening it. */
export async function withVolume<T>(volumePath: string, fn: (ops: VolumeOps, live: boolean) => Promise<T>): Promise<T> {
  const dir = resolve(volumePath)
  const { ControlClient } = await controlClientModule()
  const client = await ControlClient.connect(dir)
  if (client) {
    try {
      return await fn(client, true)
    } finally {
      client.close()
    }
  }
  const [{ Volume }, { localOps }, { printVolumeWarnings }] = await Promise.all([
    volumeModule(),
    import('../control/volume-ops.js'),
    import('./event-warnings.js'),
  ])
  const volume = await Volume.open(dir)
  const stopWarnings = printVolumeWarnings(volume)
  try {
    return await fn(localOps(volume), false)
  } finally {
    // Closing waits for an autoextend in flight, whose outcome may still be a warning.
    await volume.close()
    stopWarnings()
  }
}

async function deviceArg(spec: string): Promise<{ volume: string; snapshot: string | null }> {
  const { parseDevice } = await volumeModule()
  try {
    return parseDevice(spec)
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
}

async function snapshotRequired(spec: string): Promise<{ volume: string; snapshot: string }> {
  const { volume, snapshot } = await deviceArg(spec)
  if (!snapshot) throw new UsageError(`expected VOL@SNAP, got '${spec}'`)
  return { volume, snapshot }
}

/**
 * A device address as the engine takes it: a device URI as given, a path made absolute (a served
 * volume's server runs elsewhere).
 */
async function deviceAddressArg(text: string): Promise<string> {
  const { checkNotUnknownUri, isDeviceUri } = await import('../device/open-device.js')
  checkNotUnknownUri(text)
  return isDeviceUri(text) ? text : resolve(text)
}

async function readStdin(): Promise<Uint8Array> {
  const pieces: Buffer[] = []
  for await (const chunk of process.stdin) pieces.push(chunk as Buffer)
  return Buffer.concat(pieces)
}

function buildProgram(): Command {
  const program = new Command('blocksnap')
  program
    .description('Copy-on-write snapshots and live merge for disk images, compatible with Linux dm-snapshot')
    .version(VERSION, '-V, --version')
    .showHelpAfterError(false)
    .exitOverride()
    .configureOutput({ outputError: () => {} })

  program
    .command('create')
    .description('create a volume directory holding a sparse origin or a copy of IMAGE, or over an origin used in place')
    .argument('<VOL>', 'volume directory to create')
    .option('--size <SIZE>', 'origin size (bytes or K/M/G/T)', sizeArg('size'))
    .option('--from <IMAGE>', 'copy this image as the origin')
    .option('--origin <PATH|URI>', 'use this image file, block device or NBD URI as the origin in place, without copying it')
    .action(async (vol: string, opts: { size?: number; from?: string; origin?: string }) => {
      const given = [opts.size, opts.from, opts.origin].filter((o) => o !== undefined).length
      if (given !== 1) throw new UsageError('give exactly one of --size, --from or --origin')
      const { Volume } = await volumeModule()
      await Volume.create(
        vol,
        opts.origin !== undefined ? { inPlaceOrigin: await deviceAddressArg(opts.origin) } : opts.from !== undefined ? { fromImage: opts.from } : { sizeBytes: opts.size as number },
      )
    })

  program
    .command('snapshot')
    .description('take a snapshot of the volume now (live if the volume is served)')
    .argument('<VOL@SNAP>')
    .option('--chunk-size <SIZE>', 'chunk size, a power of two from 512 to 512K', chunkArg, 4096)
    .addOption(new Option('--store <STORE>', 'exception store').choices(['persistent', 'transient']).default('persistent'))
    .option('--overflow', 'PO: a full COW refuses snapshot writes instead of invalidating')
    .option('--cow-size <SIZE>', "fixed COW size, or N% of the origin's size (default: grows on demand)", sizeOrShareArg('COW size', "the origin's size"))
    .option('--cow <PATH|URI>', "put the COW on this device (NBD URI, block device, file), kept on remove; fixed at the device's size unless a new file")
    .option('--warn-at <PCT>', 'warn when the COW is PCT% full, then at every 5% up to 95 (default 80 with --cow-size)', percentArg('--warn-at', 1, 99))
    .option('--no-warn-at', 'no fill warnings')
    .option('--autoextend-threshold <PCT>', 'with --cow-size: grow the COW once it is PCT% full (100: never)', percentArg('--autoextend-threshold', 1, 100))
    .option('--autoextend-percent <PCT>', 'grow it by PCT% of its size (default 20)', percentArg('--autoextend-percent', 1, 1_000_000_000))
    .option('--json', 'print the new snapshot as JSON (docs/json.md)')
    .action(async (spec: string, opts: SnapshotFlags) => {
      const { volume, snapshot } = await snapshotRequired(spec)
      if (opts.autoextendPercent !== undefined && opts.autoextendThreshold === undefined) {
        throw new UsageError('--autoextend-percent needs --autoextend-threshold')
      }
      const cowDevice = opts.cow === undefined ? undefined : await deviceAddressArg(opts.cow)
      if (opts.autoextendThreshold !== undefined && opts.cowSize === undefined) {
        throw new UsageError('--autoextend-threshold needs --cow-size: a COW without one grows on demand')
      }
      const info = await withVolume(volume, async (ops, live) => {
        if (opts.store === 'transient' && !live) {
          throw new SnapError('SNAP_BAD_ARGUMENT', 'transient snapshots live only as long as a server: serve the volume first')
        }
        const cowSizeBytes = opts.cowSize === undefined ? undefined : cowBytes(opts.cowSize, (await ops.list()).sizeBytes, opts.chunkSize)
        await ops.snapshot(snapshot, {
          chunkSizeBytes: opts.chunkSize,
          store: opts.store,
          ...(opts.overflow ? { overflow: true } : {}),
          ...(cowSizeBytes !== undefined ? { cowSizeBytes } : {}),
          ...(cowDevice !== undefined ? { cowDevice } : {}),
          ...(opts.warnAt === undefined ? {} : { warnAtPercent: opts.warnAt === false ? null : opts.warnAt }),
          ...(opts.autoextendThreshold === undefined ? {} : { autoextendThresholdPercent: opts.autoextendThreshold }),
          ...(opts.autoextendPercent === undefined ? {} : { autoextendPercent: opts.autoextendPercent }),
        })
        return opts.json ? ops.list() : null
      })
      if (info) printJson({ device: spec, snapshot: snapshotInfo(info, snapshot) })
    })

  program
    .command('list')
    .description('list the snapshots of a volume')
    .argument('<VOL>')
    .option('--json', 'machine-readable output (docs/json.md)')
    .action(async (vol: string, opts: { json?: boolean }) => {
      const info = await withVolume(vol, (ops) => ops.list())
      if (opts.json) printJson({ ...info })
      else process.stdout.write(formatList(info))
    })

  program
    .command('status')
    .description("print the kernel's dmsetup status line for VOL or VOL@SNAP")
    .argument('<DEVICE>')
    .option('--json', 'the status line with the snapshot and merge it describes, as JSON (docs/json.md)')
    .action(async (spec: string, opts: { json?: boolean }) => {
      const { volume, snapshot } = await deviceArg(spec)
      const { line, info } = await withVolume(volume, async (ops) => ({ line: await ops.status(snapshot), info: await ops.list() }))
      const warnings = brokenWarnings(info, snapshot)
      if (opts.json) {
        printJson({
          device: spec,
          statusLine: line,
          snapshot: snapshot === null ? null : snapshotInfo(info, snapshot),
          merge: info.merge,
          warnings: warnings.split('\n').filter((w) => w !== '').map((w) => w.replace(/^blocksnap: warning: /, '')),
        })
      } else {
        process.stdout.write(`${line}\n`)
        process.stderr.write(warnings)
      }
    })

  program
    .command('read')
    .description('read bytes from VOL or VOL@SNAP')
    .argument('<DEVICE>')
    .option('--offset <SIZE>', 'byte offset (bytes or K/M/G/T)', sizeArg('offset'), 0)
    .option('--length <SIZE>', 'bytes to read (bytes or K/M/G/T; default: to the end)', sizeArg('length'))
    .option('--output <FILE>', 'write to FILE instead of stdout')
    .action(async (spec: string, opts: { offset: number; length?: number; output?: string }) => {
      const { volume, snapshot } = await deviceArg(spec)
      const readAll = (write: (data: Uint8Array) => Promise<void>) =>
        withVolume(volume, async (ops) => {
          const size = await ops.size(snapshot)
          const length = opts.length ?? Math.max(0, size - opts.offset)
          if (opts.offset + length > size) {
            throw new SnapError('SNAP_OUT_OF_RANGE', `range ${opts.offset}+${length} is beyond the end (${size} bytes)`)
          }
          const piece = 4 * 1024 * 1024
          for (let done = 0; done < length; done += piece) {
            await write(await ops.read(snapshot, opts.offset + done, Math.min(piece, length - done)))
          }
        })
      if (opts.output !== undefined) {
        await writeOutputFile(opts.output, readAll)
      } else {
        await readAll(async (data) => {
          if (!process.stdout.write(data)) await new Promise((r) => process.stdout.once('drain', r))
        })
      }
    })

  program
    .command('write')
    .description('write stdin (or FILE) to VOL or VOL@SNAP at --offset')
    .argument('<DEVICE>')
    .requiredOption('--offset <SIZE>', 'byte offset (bytes or K/M/G/T)', sizeArg('offset'))
    .option('--input <FILE>', 'read from FILE instead of stdin')
    .action(async (spec: string, opts: { offset: number; input?: string }) => {
      const { volume, snapshot } = await deviceArg(spec)
      if (opts.input !== undefined && !(await stat(opts.input).catch(() => null))) {
        throw new SnapError('SNAP_NOT_FOUND', `input file ${opts.input} does not exist`)
      }
      const data = opts.input !== undefined ? await readFile(opts.input) : await readStdin()
      await withVolume(volume, async (ops) => {
        const before = await ops.list()
        await ops.write(snapshot, opts.offset, data)
        await ops.flush(snapshot)
        for (const line of snapshotWarnings(volume, before, await ops.list())) process.stderr.write(`${line}\n`)
      })
    })

  mergeCommand(program, withVolume)
  mapDumpCommands(program, withVolume, (message) => new UsageError(message))
  backupCommands(program, withVolume, deviceArg, (message) => new UsageError(message))

  program
    .command('remove')
    .description('remove a snapshot and its COW file (one outside the volume directory is kept)')
    .argument('<VOL@SNAP>')
    .option('--force', 'remove even when NBD clients have it open, or when it is broken')
    .option('--json', 'print what was removed as JSON (docs/json.md)')
    .action(async (spec: string, opts: { force?: boolean; json?: boolean }) => {
      const { volume, snapshot } = await snapshotRequired(spec)
      const removed = await withVolume(volume, async (ops) => {
        const before = opts.json ? snapshotInfo(await ops.list(), snapshot) : null
        await ops.remove(snapshot, opts.force ? { force: true } : {})
        return before
      })
      if (removed) {
        const cowDeleted = !removed.cowExternal && (await stat(removed.cowPath).catch(() => null)) === null
        printJson({ device: spec, removed: { name: removed.name, cowPath: removed.cowPath, cowDeleted } })
      }
    })

  program
    .command('import')
    .description('adopt a kernel-format persistent COW made for this origin')
    .argument('<VOL@SNAP>')
    .requiredOption('--cow <FILE|URI>', 'the COW device image (a file, block device or NBD URI)')
    .option('--in-place', 'use it where it is instead of copying it into the volume')
    .option('--json', 'print the adopted snapshot as JSON (docs/json.md)')
    .action(async (spec: string, opts: { cow: string; inPlace?: boolean; json?: boolean }) => {
      const { volume, snapshot } = await snapshotRequired(spec)
      const info = await withVolume(volume, async (ops) => {
        await ops.importCow(snapshot, await deviceAddressArg(opts.cow), opts.inPlace === true)
        return opts.json ? ops.list() : null
      })
      if (info) printJson({ device: spec, snapshot: snapshotInfo(info, snapshot) })
    })

  program
    .command('check')
    .description('verify COW metadata; exit 0 when clean, 3 with a description of the damage when not')
    .argument('<VOL[@SNAP]>')
    .option('--json', 'the verdict and the problems as JSON (docs/json.md)')
    .action(async (spec: string, opts: { json?: boolean }) => {
      const { volume, snapshot } = await deviceArg(spec)
      // Offline, the COW files are verified without attaching them: attaching would stop at the
      // first problem, and check is there to describe all of them.
      const { ControlClient } = await controlClientModule()
      const client = await ControlClient.connect(resolve(volume))
      let result: { clean: boolean; problems: string[] }
      if (client) {
        try {
          result = await client.check(snapshot)
        } finally {
          client.close()
        }
      } else {
        const { checkVolumeFiles } = await import('../volume/check.js')
        result = await checkVolumeFiles(volume, snapshot)
      }
      if (opts.json) {
        // Each problem is "SNAP: what is wrong" (checkCow's findings prefixed with the snapshot).
        const problems = result.problems.map((p) => {
          const colon = p.indexOf(': ')
          return { snapshot: p.slice(0, colon), problem: p.slice(colon + 2) }
        })
        printJson({ device: spec, clean: result.clean, problems })
      } else for (const p of result.problems) process.stderr.write(`blocksnap: check: ${p}\n`)
      if (!result.clean) process.exitCode = EXIT_DAMAGE
    })

  program
    .command('serve')
    .description('serve volumes over NBD (origin as NAME, snapshots as NAME@SNAP) and take live commands')
    .argument('[VOL...]', 'volume directories (replace the --config file\'s volumes)')
    .option('--config <FILE>', 'read settings from this JSON file (keys as in README "Running blocksnap as a service"); flags override it')
    .option('--listen <HOST:PORT>', 'TCP address', '127.0.0.1:10809')
    .option('--socket <PATH>', 'also listen on this Unix socket')
    .option('--read-only', 'export everything read-only')
    .option('--tls-psk <FILE>', 'PSK file (username:hexkey lines); only clients with one of its keys get in')
    .option('--tls-cert <FILE>', 'X.509 certificate (PEM)')
    .option('--tls-key <FILE>', 'X.509 private key (PEM)')
    .option('--tls-ca <FILE>', 'CA certificates (PEM) that client certificates must be signed by; turns on --tls-verify-peer')
    .option('--tls-verify-peer', 'admit only clients whose certificate the --tls-ca CA signed (default when --tls-ca is given)')
    .option('--no-tls-verify-peer', 'do not ask clients for certificates, even with --tls-ca')
    .addOption(new Option('--tls <MODE>', 'TLS policy').choices(['off', 'allow', 'require']))
    .option(
      '--write-back <SIZE>',
      'answer origin writes that wait for snapshot copies once the copies start, holding up to SIZE of them in memory until they land; a flush waits for them (default 16M; 0: answer only after the copies commit)',
      sizeArg('write-back size'),
    )
    .option('--handshake-limit <SECONDS>', 'drop a client that has not finished the NBD handshake after SECONDS (0: never)', intArg('handshake limit'), 10)
    .option('--max-connections <N>', 'serve at most N clients at once; more are closed before the handshake', positiveArg('max connections'), 16)
    .option(
      '--max-pending <SIZE>',
      'stop reading requests while unanswered ones hold SIZE of payloads and read buffers, across all clients (one request may go over)',
      positiveSizeArg('max pending'),
      256 * 1024 * 1024,
    )
    .option('--metrics <[HOST:]PORT>', 'serve Prometheus metrics at /metrics and a live status page at / over HTTP (HOST defaults to 127.0.0.1)')
    .option('--on-event <CMD>', 'run CMD with sh -c for every event (fill warnings, autoextend, invalidation, merges, client errors), the event as a JSON line on stdin')
    .option('--pid-file <PATH>', 'write the server\'s PID here once it serves; removed when it stops')
    .option('--log-file <PATH>', 'log here instead of stderr; SIGHUP reopens it (for logrotate) instead of stopping the server')
    .option('--lease-seconds <N>', 'lease period of volumes on Ceph RBD, renewed every third of it; another host takes a volume whose lease went unrenewed for 1.5 periods', positiveArg('lease seconds'))
    .option('--takeover', 'take volumes on Ceph RBD over from a live owner: fence it (OSD blocklist) first, then take its lease')
    .addHelpText('after', SERVE_TLS_HELP)
    .action(async (vols: string[], opts: ServeFlags & { config?: string }, command: Command) => {
      if (opts.config !== undefined) vols = await applyConfigFile(command, opts.config, vols)
      if (vols.length === 0) throw new UsageError('serve needs at least one VOL (or "volumes" in the --config file)')
      const flags = parseServeFlags(command.opts<ServeFlags>())
      const { serveVolumes } = await import('./serve.js')
      await serveVolumes(vols, flags)
    })

  program
    .command('start')
    .description('create ./var/default (1 GiB, sparse) if missing and serve it on 127.0.0.1:10809')
    .option('--dir <DIR>', 'volume directory', 'var/default')
    .option('--listen <HOST:PORT>', 'TCP address', '127.0.0.1:10809')
    .action(async (opts: { dir: string; listen: string }) => {
      const dir = resolve(opts.dir)
      const flags = parseServeFlags({ listen: opts.listen })
      const [{ Volume }, { serveVolumes }] = await Promise.all([volumeModule(), import('./serve.js')])
      if (!(await stat(dir).catch(() => null))) {
        await mkdir(resolve(dir, '..'), { recursive: true })
        await Volume.create(dir, { sizeBytes: 1024 ** 3 })
        process.stderr.write(`blocksnap: created ${dir} (1 GiB sparse volume)\n`)
      }
      await serveVolumes([dir], flags, { printHelp: true })
    })

  program
    .command('completion')
    .description('print a shell completion script for bash or zsh')
    .addArgument(new Argument('<SHELL>', 'the shell').choices(['bash', 'zsh']))
    .action(async (shell: 'bash' | 'zsh') => {
      const { bashCompletion, zshCompletion } = await import('./completion.js')
      process.stdout.write(shell === 'bash' ? bashCompletion(program) : zshCompletion(program))
    })

  addExamples(program)
  return program
}

/** `name`'s entry in a listing (it was just created, imported or asked about, so it is there). */
function snapshotInfo(info: VolumeInfo, name: string): SnapshotInfo {
  const found = info.snapshots.find((s) => s.name === name)
  if (!found) throw new SnapError('SNAP_NOT_FOUND', `no snapshot '${name}' in volume ${info.name}`)
  return found
}

/** A fixed COW size: as given, or a share of the origin rounded up to whole chunks. */
function cowBytes(size: SizeOrShare, originBytes: number, chunkBytes: number): number {
  if ('bytes' in size) return size.bytes
  const bytes = Math.ceil((originBytes * size.percent) / 100 / chunkBytes) * chunkBytes
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`COW size ${size.percent}% of ${originBytes} bytes is too large`)
  return bytes
}

/** Who `serve` lets in under each TLS setup; docs/security.md says the same at more length. */
const SERVE_TLS_HELP = `
Who is authenticated (TLS is required once key material is given, unless --tls allow):
  no TLS options        nobody: any client that can connect reads and writes
  --tls-psk             only clients with a key from the psk file
  --tls-psk + --tls-cert/--tls-key
                        only clients with a key from the psk file (the certificate alone admits nobody)
  --tls-cert/--tls-key  NOBODY: any TLS client gets in; the certificate only proves the server to
                        clients (a warning is logged at startup)
  --tls-cert/--tls-key + --tls-ca
                        only clients with a certificate signed by the CA (verified by default;
                        --no-tls-verify-peer turns that off)
  --tls-psk + --tls-cert/--tls-key + --tls-ca
                        clients with a key from the psk file or a certificate signed by the CA
  --tls allow           plaintext clients too, unauthenticated
`

/** Applies `serve --config FILE` to the command's options; returns the volumes to serve. */
async function applyConfigFile(command: Command, file: string, vols: string[]): Promise<string[]> {
  const { ConfigError, applyServeConfig, loadServeConfig } = await import('./serve-config.js')
  try {
    const config = await loadServeConfig(file)
    applyServeConfig(command, config, file)
    return vols.length > 0 ? vols : [...(config.volumes ?? [])]
  } catch (err) {
    throw err instanceof ConfigError ? new UsageError(err.message) : err
  }
}

interface SnapshotFlags {
  chunkSize: number
  store: 'persistent' | 'transient'
  overflow?: boolean
  cowSize?: SizeOrShare
  cow?: string
  json?: boolean
  /** false: --no-warn-at. */
  warnAt?: number | false
  autoextendThreshold?: number
  autoextendPercent?: number
}

interface ServeFlags {
  listen: string
  socket?: string
  readOnly?: boolean
  tlsPsk?: string
  tlsCert?: string
  tlsKey?: string
  tlsCa?: string
  tlsVerifyPeer?: boolean
  tls?: 'off' | 'allow' | 'require'
  writeBack?: number
  handshakeLimit?: number
  maxConnections?: number
  maxPending?: number
  metrics?: string
  onEvent?: string
  pidFile?: string
  logFile?: string
  leaseSeconds?: number
  takeover?: boolean
}

/** `--metrics PORT` (loopback) or `HOST:PORT`, `[IPv6]:PORT`. */
function parseMetricsAddress(text: string): { host: string; port: number } {
  const m = /^(?:(.*):)?(\d+)$/.exec(text)
  const port = Number(m?.[2])
  if (!m || port > 65535) throw new UsageError(`invalid --metrics '${text}' ([HOST:]PORT)`)
  const host = (m[1] ?? '').replace(/^\[(.*)\]$/, '$1')
  return { host: host === '' ? '127.0.0.1' : host, port }
}

function parseServeFlags(opts: ServeFlags) {
  const m = /^(.*):(\d+)$/.exec(opts.listen)
  if (!m) throw new UsageError(`invalid --listen '${opts.listen}' (HOST:PORT)`)
  const port = Number(m[2])
  if (port > 65535) throw new UsageError(`invalid port ${port}`)
  if ((opts.tlsCert === undefined) !== (opts.tlsKey === undefined)) throw new UsageError('--tls-cert and --tls-key go together')
  if (opts.tlsVerifyPeer === true && opts.tlsCa === undefined) throw new UsageError('--tls-verify-peer needs --tls-ca (the CA that signs client certificates)')
  if (opts.tlsCa !== undefined && opts.tlsCert === undefined) throw new UsageError('--tls-ca needs --tls-cert and --tls-key (client certificates are asked for in a certificate handshake)')
  return {
    host: (m[1] as string).replace(/^\[(.*)\]$/, '$1'),
    port,
    ...(opts.socket ? { socket: opts.socket } : {}),
    readOnly: opts.readOnly === true,
    ...(opts.tlsPsk ? { tlsPsk: opts.tlsPsk } : {}),
    ...(opts.tlsCert ? { tlsCert: opts.tlsCert, tlsKey: opts.tlsKey as string } : {}),
    ...(opts.tlsCa ? { tlsCa: opts.tlsCa } : {}),
    ...(opts.tlsVerifyPeer === undefined ? {} : { tlsVerifyPeer: opts.tlsVerifyPeer }),
    ...(opts.tls ? { tls: opts.tls } : {}),
    ...(opts.writeBack === undefined ? {} : { writeBackBytes: opts.writeBack }),
    ...(opts.handshakeLimit === undefined ? {} : { handshakeTimeoutMs: opts.handshakeLimit * 1000 }),
    ...(opts.maxConnections === undefined ? {} : { maxConnections: opts.maxConnections }),
    ...(opts.maxPending === undefined ? {} : { maxPendingBytes: opts.maxPending }),
    ...(opts.metrics === undefined ? {} : { metrics: parseMetricsAddress(opts.metrics) }),
    ...(opts.onEvent === undefined ? {} : { onEvent: opts.onEvent }),
    ...(opts.pidFile === undefined ? {} : { pidFile: resolve(opts.pidFile) }),
    ...(opts.logFile === undefined ? {} : { logFile: resolve(opts.logFile) }),
    ...(opts.leaseSeconds === undefined ? {} : { leaseSeconds: opts.leaseSeconds }),
    ...(opts.takeover === true ? { takeover: true } : {}),
  }
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram()
  try {
    await program.parseAsync(argv, { from: 'user' })
    return typeof process.exitCode === 'number' ? process.exitCode : EXIT_OK
  } catch (err) {
    if (isHelpOrVersion(err)) return EXIT_OK
    return reportError(err, wantsJson(argv))
  }
}

// Before any command allocates: glibc would otherwise hand freed socket and payload buffers back
// to the kernel and fault them in again (util/heap-trim.ts).
keepFreedHeapMapped()
watchClosedOutput()
const code = await main(process.argv.slice(2))
if (code !== EXIT_OK || process.exitCode) process.exitCode = code
