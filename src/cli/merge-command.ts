/**
 * `blocksnap merge VOL@SNAP [--wait] [--rate N] [--force]`. Offline it runs in the foreground
 * with a progress bar on a TTY (Ctrl-C stops at a step boundary; rerunning resumes, at the rate
 * recorded in the manifest unless --rate gives a new one). On a served volume it starts the
 * merge in the server and returns, or with --wait follows its progress; a snapshot NBD clients
 * have open is refused unless --force.
 */
import { type Command, InvalidArgumentError } from 'commander'
import { SnapError } from '../errors.js'
import type { ControlClient } from '../control/control-client.js'
import type { VolumeOps } from '../control/volume-ops.js'
import type { MergeProgress } from '../merge/merge.js'
import { resolve } from 'node:path'

type WithVolume = <T>(path: string, fn: (ops: VolumeOps, live: boolean) => Promise<T>) => Promise<T>

interface Reporter {
  update(p: MergeProgress): void
  stop(): void
}

// Imported when the command runs, not when the CLI starts (see main.ts).
async function reporter(): Promise<Reporter> {
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

async function offlineMerge(volumePath: string, snapshot: string, rate: number | undefined): Promise<void> {
  // Nobody else can have the snapshot open offline (a server would own the volume): --force is moot.
  const { Volume } = await import('../volume/volume.js')
  const volume = await Volume.open(volumePath)
  const report = await reporter()
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
  } finally {
    report.stop()
    process.off('SIGINT', onSigint)
    await volume.close()
  }
}

async function liveMerge(client: ControlClient, snapshot: string, rate: number | undefined, wait: boolean, force: boolean): Promise<void> {
  await client.call('merge', { name: snapshot, force, ...(rate === undefined ? {} : { rate }) })
  if (!wait) return
  const report = await reporter()
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
    .option('--rate <BYTES_PER_SECOND>', 'limit the merge rate, kept for when the merge resumes (0: no limit)', (t: string) => {
      if (!/^\d+$/.test(t) || !Number.isSafeInteger(Number(t))) throw new InvalidArgumentError(`invalid rate '${t}'`)
      return Number(t)
    })
    .option('--force', 'merge it even while NBD clients have the snapshot open (they get ESHUTDOWN)')
    .action(async (spec: string, opts: { wait?: boolean; rate?: number; force?: boolean }) => {
      const { volume, snapshot } = await usageOnBadDevice(spec)
      if (!snapshot) throw new InvalidArgumentError(`expected VOL@SNAP, got '${spec}'`)
      const { ControlClient } = await import('../control/control-client.js')
      const client = await ControlClient.connect(resolve(volume))
      if (client) {
        try {
          await liveMerge(client, snapshot, opts.rate, opts.wait === true, opts.force === true)
        } finally {
          client.close()
        }
        return
      }
      await offlineMerge(volume, snapshot, opts.rate)
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
