/**
 * `npm run bench`: side-by-side benchmarks of blocksnap against nbdkit, qemu-nbd and the machine's
 * own limit, all over 127.0.0.1, all driven by the same fio `nbd`-engine jobs in one run, plus
 * in-process measures (exception table, COW open, JavaScript work per MiB).
 * Writes BENCHMARKS.md (ratios against the floors, raw figures beside them, the machine) and
 * bench/results.json.
 *
 *   npm run bench [-- --runtime 5] [--rounds 2] [--size 512M] [--max 1e7] [--open 1e7]
 *                   [--full (exception table up to 1e8)] [--only SUITE,...]
 *                   [--profile DIR (blocksnap servers run with --cpu-prof into DIR)] [--no-write]
 *
 * Suites (--only; all by default): see suites/index.ts — standard, firsttouch, snapread, merge,
 * scale, big, jswork. `--only` with `--no-write` is the quick check of one suite: results go
 * to a file beside the scratch directory and BENCHMARKS.md is left alone. Suites' own options:
 * jswork --js-mib N (MiB per case, default 32) and --record-js-baseline (rewrites
 * bench/baseline-js-work.json from this run).
 *
 * Ratios are only ever taken between figures of the same round, and rounds interleave every
 * server, so a load spike elsewhere on the machine lands on both sides of most ratios. Each fio
 * job records how much CPU other processes used meanwhile (/proc/stat minus fio, the server and
 * this process), so noise is visible in the raw tables.
 *
 * Layout: lib/ (arguments, processes, servers, fio, /proc sampling, files), suites/ (one module
 * per job, registered in suites/index.ts), report/ (BENCHMARKS.md). Nothing here imports test/.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from './lib/args.js'
import type { BenchContext, Results } from './lib/context.js'
import { makeBase, syncAll } from './lib/files.js'
import { log, secondsSinceStart } from './lib/log.js'
import { BENCH_DIR, ROOT } from './lib/paths.js'
import { ensurePeers } from './lib/proc.js'
import { fmt } from './report/format.js'
import { machine } from './report/machine.js'
import { build, NOTES_PLACEHOLDER } from './report/markdown.js'
import { SUITES } from './suites/index.js'
import { keepFreedHeapMapped } from '../src/util/heap-trim.js'

async function main(): Promise<void> {
  // The in-process suites run the engine here, so this process is tuned as the CLI is.
  keepFreedHeapMapped()
  const argv = process.argv.slice(2)
  const args = parseArgs(argv, SUITES.map((s) => s.name))
  const selected = SUITES.filter((s) => args.only.has(s.name))
  const usesPeers = selected.some((s) => s.usesPeers)
  if (usesPeers) ensurePeers()
  const workDir = mkdtempSync(join(tmpdir(), 'blocksnap-bench-'))
  // Every suite's keys are present even when it did not run; totalSeconds stays the last key.
  const suiteResults = Object.assign({}, ...SUITES.map((s) => s.initialResults())) as Record<string, unknown>
  const results: Results = { machine: {}, args: { ...args, only: [...args.only] }, ...suiteResults, totalSeconds: 0 }
  const ctx: BenchContext = { args, argv, workDir, baseImage: join(workDir, 'base.img'), results }
  results.machine = machine(workDir)
  log(`work dir ${workDir}; ${JSON.stringify(results.machine)}`)
  const cleanup = () => rmSync(workDir, { recursive: true, force: true })
  process.once('SIGINT', () => {
    cleanup()
    process.exit(130)
  })
  try {
    if (usesPeers) {
      makeBase(ctx.baseImage, args.size)
      syncAll()
    }
    for (let r = 1; r <= args.rounds; r++) {
      for (const s of selected) await s.round?.(ctx, r)
    }
    for (const s of selected) await s.run?.(ctx)
  } finally {
    cleanup()
  }
  results.totalSeconds = secondsSinceStart()
  const { md, floors } = build(results, args, SUITES)
  const json = JSON.stringify({ ...results, floors }, null, 1) + '\n'
  if (args.write) {
    writeFileSync(join(BENCH_DIR, 'results.json'), json)
    const target = join(ROOT, 'BENCHMARKS.md')
    // Hand-written analysis below the generated part survives a re-run.
    const keep = existsSync(target) ? (/\n<!-- analysis -->\n[\s\S]*$/.exec(readFileSync(target, 'utf8'))?.[0] ?? '') : ''
    writeFileSync(target, md.replace(NOTES_PLACEHOLDER, '') + keep)
  } else {
    writeFileSync(join(workDir + '-results.json'), json)
    log(`results (not written to bench/): ${workDir}-results.json`)
  }
  process.stdout.write(md.replace(NOTES_PLACEHOLDER, '').split('## Noise')[0] ?? '')
  log(`done in ${fmt(results.totalSeconds / 60, 1)} min`)
}

await main()
