/**
 * `blocksnap merge VOL@SNAP [--wait] [--rate RATE] [--force] [--json]`. Offline it runs in the foreground
 * with a progress bar on a TTY (Ctrl-C stops at a step boundary; rerunning resumes, at the rate
 * recorded in the manifest unless --rate gives a new one). On a served volume it starts the
 * merge in the server and returns, or with --wait follows its progress; a snapshot NBD clients
 * have open is refused unless --force. With --json, progress goes to stdout as JSON lines and a
 * result line ends it (docs/json.md).
 */
import { type Command, InvalidArgumentError } from 'commander'
import { SnapError } from '../errors.js'
import type { ControlClient } from '../control/control-client.js'
import type { VolumeOps } from '../control/volume-ops.js'
import type { MergeProgress } from '../merge/merge.js'
import { resolve } from 'node:path'
import { rateArg } from './args.js'
import { jsonLine } from './render.js'

type WithVolume = <T>(path: string, fn: (ops: VolumeOps, live: boolean) => Promise<T>) => Promise<T>

interface Reporter {
  update(p: MergeProgress): void
  stop(): void
}

/** One JSON line per change of progress (and always the first and the last). */
function jsonReporter(device: string): Reporter {
  let lastDone = -1
  let last = 0
  return {
    update(p) {
      const now = Date.now()
      const final = p.doneChunks >= p.totalChunks
      if (p.doneChunks === lastDone || (lastDone !== -1 && !final && now - last < 250)) return
      last = now
      lastDone = p.doneChunks
      const { doneChunks, totalChunks, doneBytes, totalBytes, rateBytesPerSecond, etaSeconds } = p
      process.stdout.write(jsonLine({ type: 'progress', device, doneChunks, totalChunks, doneBytes, totalBytes, rateBytesPerSecond, etaSeconds }))
    },
    stop() {},
  }
}

// Imported when the command runs, not when the CLI starts (see main.ts).
async function reporter(json: string | null): Promise<Reporter> {
  if (json !== null) return jsonReporter(json)
  if (process.stderr.isTTY) {
    const { default: cliProgress } = await import('cli-progress')
    const bar = new cliProgress.SingleBar(
      {
        stream: process.stderr,
        format: 'merging [{bar}] {percentage}% | {value}/{total} chunks | {rate} | ETA {eta_formatted}',
        hideCursor: true,
      },
      cliProgress.Presets.shades_classic,
    )
    let started = false
    return {
      update(p) {
        const rate = `${(p.rateBytesPerSecond / 1048576).toFixed(1)} MiB/s`
        if (!started) {
          bar.start(Math.max(1, p.totalChunks), p.doneChunks, { rate })
          started = true
        } else bar.update(p.doneChunks, { rate })
      },
      stop() {
        if (started) bar.stop()
      },
    }
  }
  let last = 0
  let lastDone = -1
  return {
    update(p) {
      const now = Date.now()
      if (p.doneChunks === lastDone || (now - last < 2000 && p.doneChunks < p.totalChunks)) return
      last = now
      lastDone = p.doneChunks
      process.stderr.write(`blocksnap: merged ${p.doneChunks}/${p.totalChunks} chunks (${(p.rateBytesPerSecond / 1048576).toFixed(1)} MiB/s)\n`)
    },
    stop() {},
  }
}

/** The device name for --json output, or null for human output. */
type JsonDevice = string | null

async function offlineMerge(volumePath: string, snapshot: string, rate: number | undefined, json: JsonDevice): Promise<void> {
  // Nobody else can have the snapshot open offline (a server would own the volume): --force is moot.
  const { Volume } = await import('../volume/volume.js')
  const volume = await Volume.open(volumePath)
  const report = await reporter(json)
  let interrupted = false
  const onSigint = () => {
    interrupted = true
    void volume.merge?.stop()
  }
  process.once('SIGINT', onSigint)
  try {
    const merge = await volume.startMerge(snapshot, rate === undefined ? {} : { rateBytesPerSecond: rate })
    merge.on('progress', (p) => report.update(p))
    report.update(merge.progress())
    await merge.done
    if (interrupted || merge.state === 'stopped') {
      throw new SnapError('SNAP_ABORTED', `merge of ${snapshot} stopped; run the command again to resume`)
    }
    report.update(merge.progress())
  } finally {
    report.stop()
    process.off('SIGINT', onSigint)
    await volume.close()
  }
}

async function liveMerge(client: ControlClient, snapshot: string, rate: number | undefined, wait: boolean, force: boolean, json: JsonDevice): Promise<void> {
  await client.call('merge', { name: snapshot, force, ...(rate === undefined ? {} : { rate }) })
  if (!wait) return
  const report = await reporter(json)
  try {
    for (;;) {
      const s = await client.call<{ state: string; failure?: string | null } & MergeProgress>('merge-status')
      if (s.state === 'none' || s.state === 'complete') return
      if (s.state === 'failed') throw new SnapError('SNAP_MERGE_FAILED', `merge of ${snapshot} failed (${s.failure ?? 'see the server log'})`)
      if (s.state === 'stopped') throw new SnapError('SNAP_ABORTED', `merge of ${snapshot} was stopped`)
      if (typeof s.totalChunks === 'number') report.update(s)
      await new Promise((r) => setTimeout(r, 300))
    }
  } finally {
    report.stop()
  }
}

export function mergeCommand(program: Command, _withVolume: WithVolume): void {
  program
    .command('merge')
    .description('merge a snapshot back into its origin (roll the origin back to it)')
    .argument('<VOL@SNAP>')
    .option('--wait', 'on a served volume, wait for the merge to finish')
    .option('--rate <RATE>', 'limit the merge rate in bytes per second, e.g. 24M or 24M/s; kept for when the merge resumes (0: no limit)', rateArg('rate'))
    .option('--force', 'merge it even while NBD clients have the snapshot open (they get ESHUTDOWN)')
    .option('--json', 'progress as JSON lines on stdout, then a result line (docs/json.md)')
    .action(async (spec: string, opts: { wait?: boolean; rate?: number; force?: boolean; json?: boolean }) => {
      const { volume, snapshot } = await usageOnBadDevice(spec)
      if (!snapshot) throw new InvalidArgumentError(`expected VOL@SNAP, got '${spec}'`)
      const { ControlClient } = await import('../control/control-client.js')
      const client = await ControlClient.connect(resolve(volume))
      const json = opts.json ? spec : null
      // Offline, and live with --wait, the command returns once the merge is complete.
      let state: 'complete' | 'started' = 'complete'
      if (client) {
        try {
          await liveMerge(client, snapshot, opts.rate, opts.wait === true, opts.force === true, json)
        } finally {
          client.close()
        }
        if (opts.wait !== true) state = 'started'
      } else await offlineMerge(volume, snapshot, opts.rate, json)
      if (json !== null) process.stdout.write(jsonLine({ type: 'result', device: spec, state }))
    })
}

/** A malformed device name is a usage error (exit 2), as for every other command. */
async function usageOnBadDevice(spec: string): Promise<{ volume: string; snapshot: string | null }> {
  const { parseDevice } = await import('../volume/volume.js')
  try {
    return parseDevice(spec)
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message)
  }
}
