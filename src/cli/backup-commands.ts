/**
 * `blocksnap diff FROM TO [--json]`, `export-diff VOL@B [--from A] --output FILE|-` and
 * `import-diff VOL --input FILE|- [--force]`: changed-block lists and incremental replication.
 * All three run live on a served volume (through its control socket) or open it themselves.
 * Progress and summary lines go to stderr: stdout may be the stream itself.
 */
import { createReadStream } from 'node:fs'
import { stat, unlink } from 'node:fs/promises'
import { resolve } from 'node:path'
import type { Command } from 'commander'
import { SnapError } from '../errors.js'
import type { VolumeOps } from '../control/volume-ops.js'
import type { DiffResult } from '../backup/diff.js'
import type { BackupProgress } from '../backup/export-diff.js'
import { writeOutputFile } from './output-file.js'

type WithVolume = <T>(path: string, fn: (ops: VolumeOps, live: boolean) => Promise<T>) => Promise<T>
type Device = { volume: string; snapshot: string | null }

function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`
}

interface ReportFlags {
  readonly progress?: boolean
  readonly json?: boolean
}

/**
 * Progress lines on stderr: with --progress at most one a second per phase (and the last one of
 * each phase); with --json they are JSON objects. done() prints the summary (with --json, or
 * with --progress as a sentence).
 */
function reporter(verb: string, flags: ReportFlags) {
  let lastAt = 0
  let lastPhase = ''
  const line = (text: string) => process.stderr.write(`${text}\n`)
  return {
    progress(p: BackupProgress): void {
      if (!flags.progress) return
      const now = Date.now()
      const final = p.totalBytes !== null && p.doneBytes === p.totalBytes
      if (p.phase === lastPhase && now - lastAt < 1000 && !final) return
      lastAt = now
      lastPhase = p.phase
      if (flags.json) line(JSON.stringify({ event: 'progress', ...p }))
      else {
        const of = p.totalBytes === null ? '' : ` of ${mib(p.totalBytes)} (${p.totalBytes === 0 ? 100 : Math.floor((100 * p.doneBytes) / p.totalBytes)}%)`
        line(`blocksnap: ${verb}: ${p.phase} ${mib(p.doneBytes)}${of}`)
      }
    },
    done(summary: object, sentence: string): void {
      if (flags.json) line(JSON.stringify({ event: 'done', ...summary }))
      else if (flags.progress) line(`blocksnap: ${verb}: ${sentence}`)
    },
  }
}

/** The human rendering of `diff`: one row per extent, then the totals. */
export function formatDiff(d: DiffResult, fromName: string, toName: string): string {
  const rows = [['OFFSET', 'LENGTH']]
  for (const e of d.extents) rows.push([String(e.offset), String(e.length)])
  const width = Math.max(...rows.map((r) => r[0]!.length))
  const table = rows.map((r) => `${r[0]!.padEnd(width)}  ${r[1]}`).join('\n')
  const share = d.sizeBytes > 0 ? ((100 * d.changedBytes) / d.sizeBytes).toFixed(2) : '0.00'
  const n = d.extents.length
  return (
    `${table}\n` +
    `${n} extent${n === 1 ? '' : 's'}, ${d.changedBytes} bytes changed (${share}% of ${d.sizeBytes}) ` +
    `from ${fromName} to ${toName}, granularity ${d.granularityBytes} bytes\n`
  )
}

/** `--from A` or `--from VOL@A`: the snapshot name, which must be of the exported volume. */
async function fromName(spec: string, volume: string, usage: (m: string) => Error): Promise<string> {
  if (!spec.includes('@')) return spec
  const { parseDevice } = await import('../volume/volume.js')
  const d = parseDevice(spec)
  if (d.snapshot === null || resolve(d.volume) !== resolve(volume)) throw usage(`--from ${spec} is not a snapshot of ${volume}`)
  return d.snapshot
}

async function writeStdout(data: Uint8Array): Promise<void> {
  if (!process.stdout.write(data)) await new Promise((r) => process.stdout.once('drain', r))
}

export function backupCommands(
  program: Command,
  withVolume: WithVolume,
  deviceArg: (spec: string) => Promise<Device>,
  usage: (message: string) => Error,
): void {
  program
    .command('diff')
    .description('list the extents where two views of one volume differ (VOL@SNAP, or VOL for the live origin)')
    .argument('<FROM>')
    .argument('<TO>')
    .option('--json', 'machine-readable output')
    .action(async (fromSpec: string, toSpec: string, opts: { json?: boolean }) => {
      const from = await deviceArg(fromSpec)
      const to = await deviceArg(toSpec)
      if (resolve(from.volume) !== resolve(to.volume)) throw usage(`${fromSpec} and ${toSpec} are not views of one volume`)
      const result = await withVolume(from.volume, (ops) => ops.diff(from.snapshot, to.snapshot))
      process.stdout.write(opts.json ? `${JSON.stringify(result)}\n` : formatDiff(result, fromSpec, toSpec))
    })

  program
    .command('export-diff')
    .description('write snapshot B as a diff stream: full, or with --from A only what changed since A')
    .argument('<VOL@B>')
    .option('--from <A>', 'snapshot the stream starts from (incremental); the target must hold it')
    .requiredOption('--output <FILE>', "where the stream goes ('-': stdout)")
    .option('--progress', 'progress lines on stderr')
    .option('--json', 'progress and summary lines on stderr as JSON')
    .action(async (spec: string, opts: { from?: string; output: string } & ReportFlags) => {
      const { volume, snapshot } = await deviceArg(spec)
      if (!snapshot) throw usage(`expected VOL@SNAP, got '${spec}'`)
      const from = opts.from === undefined ? null : await fromName(opts.from, volume, usage)
      // Loaded here, not at start-up: only the backup commands need the stream code.
      const { exportDiff } = await import('../backup/export-diff.js')
      const report = reporter('export-diff', opts)
      const run = (emit: (bytes: Uint8Array) => Promise<void>) =>
        withVolume(volume, (ops) => exportDiff(ops, snapshot, from, emit, (p) => report.progress(p)))
      let summary
      if (opts.output === '-') summary = await run(writeStdout)
      else {
        let result: Awaited<ReturnType<typeof run>> | undefined
        await writeOutputFile(opts.output, async (write) => {
          result = await run(write)
        })
        summary = result as Awaited<ReturnType<typeof run>>
      }
      report.done(summary, `${mib(summary.changedBytes)} covered, ${mib(summary.dataBytes)} of data, stream ${summary.streamBytes} bytes`)
    })

  program
    .command('import-diff')
    .description('bring the origin of VOL to the snapshot a diff stream carries, and record that snapshot')
    .argument('<VOL>')
    .requiredOption('--input <FILE>', "the stream ('-': stdin)")
    .option('--force', 'apply an incremental stream although VOL does not hold an unchanged snapshot A')
    .option('--progress', 'progress lines on stderr')
    .option('--json', 'progress and summary lines on stderr as JSON')
    .action(async (spec: string, opts: { input: string; force?: boolean } & ReportFlags) => {
      const { volume, snapshot } = await deviceArg(spec)
      if (snapshot) throw usage(`import-diff takes a volume, not a snapshot ('${spec}')`)
      const dir = resolve(volume)
      if (opts.input !== '-' && !(await stat(opts.input).catch(() => null))) {
        throw new SnapError('SNAP_NOT_FOUND', `input file ${opts.input} does not exist`)
      }
      if (!(await stat(dir).catch(() => null))) throw new SnapError('SNAP_NOT_FOUND', `volume ${dir} does not exist`)
      const report = reporter('import-diff', opts)
      const { applyDiffStream, stageDiffStream, stagePath } = await import('../backup/import-diff.js')
      const source = opts.input === '-' ? process.stdin : createReadStream(opts.input)
      // Verified completely before the target is touched (import-diff.ts).
      const staged = await stageDiffStream(source, stagePath(dir), (p) => report.progress(p))
      try {
        const force = opts.force === true
        const { ControlClient } = await import('../control/control-client.js')
        const client = await ControlClient.connect(dir)
        let summary
        if (client) {
          try {
            summary = await client.importDiff(staged.path, { force })
          } finally {
            client.close()
          }
        } else {
          const { Volume } = await import('../volume/volume.js')
          const vol = await Volume.open(dir)
          try {
            summary = await applyDiffStream(vol, staged, { force }, (p) => report.progress(p))
          } finally {
            await vol.close()
          }
        }
        report.done(summary, `${volume} is now at ${summary.to}: ${mib(summary.changedBytes)} covered, ${mib(summary.writtenBytes)} written`)
      } finally {
        await unlink(staged.path).catch(() => {})
      }
    })
}
