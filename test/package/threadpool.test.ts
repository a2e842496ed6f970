/**
 * The installed `blocksnap` command sizes libuv's I/O thread pool itself (cores - 1, 1..16,
 * unless UV_THREADPOOL_SIZE is set), with no shell wrapper in front of node. libuv creates all of
 * the pool's threads at its first use, and a server has used it (opening the volume) before it
 * logs "serving", so at that point the process's thread count is a fixed base (main thread, V8's
 * workers, …) plus the pool. Two servers differing only in UV_THREADPOOL_SIZE give the base;
 * `taskset` pins them to one CPU, where the default must be 1 thread, not node's own 4.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises'
import { availableParallelism, tmpdir } from 'node:os'
import { join } from 'node:path'
import { BIN, cliOk } from '../cli/helpers.js'

/** The first CPU this process may run on (a container's cpuset need not include CPU 0). */
async function firstAllowedCpu(): Promise<number> {
  const status = await readFile('/proc/self/status', 'utf8')
  const m = /^Cpus_allowed_list:\s*(\d+)/m.exec(status)
  assert.ok(m, 'no Cpus_allowed_list in /proc/self/status')
  return Number(m[1])
}

/** Starts `blocksnap serve VOL` (under `prefix`, e.g. taskset), counts its threads once it serves, stops it. */
async function threadsWhileServing(vol: string, prefix: readonly string[], uvThreadpoolSize: string | undefined): Promise<number> {
  const env: NodeJS.ProcessEnv = { ...process.env, BLOCKSNAP_LOG_LEVEL: 'info' }
  delete env.UV_THREADPOOL_SIZE
  if (uvThreadpoolSize !== undefined) env.UV_THREADPOOL_SIZE = uvThreadpoolSize
  const argv = [...prefix, process.execPath, BIN, 'serve', vol, '--listen', '127.0.0.1:0']
  const child = spawn(argv[0] as string, argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'], env })
  let log = ''
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  try {
    await new Promise<void>((resolve, reject) => {
      child.stderr.on('data', (d: Buffer) => {
        log += d.toString('utf8')
        if (log.includes('"msg":"serving ')) resolve()
      })
      void exited.then(() => reject(new Error(`serve exited before serving:\n${log}`)))
    })
    // taskset execs node, so the child's PID is the server's.
    return (await readdir(`/proc/${child.pid}/task`)).length
  } finally {
    child.kill('SIGTERM')
    await exited
  }
}

test('package: the CLI sizes the libuv pool without a wrapper (cores - 1, or UV_THREADPOOL_SIZE)', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'blocksnap-pool-'))
  try {
    const vol = join(dir, 'vol')
    await cliOk(['create', vol, '--size', '1M'])
    const pin = ['taskset', '--cpu-list', String(await firstAllowedCpu())]
    const pinnedDefault = await threadsWhileServing(vol, pin, undefined)
    const pinnedFive = await threadsWhileServing(vol, pin, '5')
    // Same base in both: the pool is 1 thread by default on one CPU (node alone would start 4).
    assert.equal(pinnedFive - pinnedDefault, 5 - 1, `threads: ${pinnedDefault} by default, ${pinnedFive} with UV_THREADPOOL_SIZE=5 (pinned to one CPU)`)
    // Unpinned, the default follows the CPUs this process may use.
    const expected = Math.min(16, Math.max(1, availableParallelism() - 1))
    const unpinnedDefault = await threadsWhileServing(vol, [], undefined)
    assert.equal(unpinnedDefault - pinnedDefault, expected - 1, `threads: ${unpinnedDefault} with ${availableParallelism()} CPUs, ${pinnedDefault} on one`)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})
