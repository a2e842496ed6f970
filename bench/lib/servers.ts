/** NBD servers as child processes on 127.0.0.1 (blocksnap, nbdkit, qemu-nbd), ready when nbdinfo answers. */
import { type ChildProcess, spawn } from 'node:child_process'
import { closeSync, openSync, readFileSync, rmSync } from 'node:fs'
import { connect } from 'node:net'
import { availableParallelism } from 'node:os'
import { join } from 'node:path'
import type { BenchContext } from './context.js'
import { freePort } from './free-port.js'
import { ROOT } from './paths.js'
import { run, sleep } from './proc.js'

export interface Server {
  readonly label: string
  readonly uri: string
  readonly pid: number
  readonly sizeBytes: number
  stop(): Promise<void>
}

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

async function startServer(
  ctx: BenchContext,
  label: string,
  cmd: string,
  argv: string[],
  port: number,
  exportName: string,
  env?: NodeJS.ProcessEnv,
): Promise<Server> {
  const logPath = join(ctx.workDir, `${label.replace(/[^A-Za-z0-9]+/g, '_')}-${port}.log`)
  const fd = openSync(logPath, 'a')
  // From the repository root, where `node --import tsx` finds tsx; every path passed is absolute.
  const child: ChildProcess = spawn(cmd, argv, { stdio: ['ignore', fd, fd], env: env ?? process.env, cwd: ROOT })
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

export async function withServer<T>(start: () => Promise<Server>, fn: (s: Server) => Promise<T>): Promise<T> {
  const s = await start()
  try {
    return await fn(s)
  } finally {
    await s.stop()
  }
}

/** The same server under another export name (a snapshot of the served volume). */
export function exportOf(server: Server, label: string, exportName: string): Server {
  return { ...server, label, uri: server.uri.replace(/\/[^/]*$/, `/${exportName}`) }
}

export async function startNbdkitFile(ctx: BenchContext, file: string): Promise<Server> {
  const port = await freePort()
  return startServer(ctx, 'nbdkit file', 'nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), 'file', file], port, '')
}

export async function startNbdkitMemory(ctx: BenchContext, size: number): Promise<Server> {
  const port = await freePort()
  return startServer(ctx, 'nbdkit memory', 'nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), 'memory', String(size)], port, '')
}

export async function startNbdkitCow(ctx: BenchContext, file: string): Promise<Server> {
  const port = await freePort()
  return startServer(
    ctx,
    'nbdkit cow',
    'nbdkit',
    ['-f', '-i', '127.0.0.1', '-p', String(port), '--filter=cow', 'file', file, 'cow-block-size=64K'],
    port,
    '',
    { ...process.env, TMPDIR: ctx.workDir },
  )
}

/** A fresh qcow2 overlay (default 64 KiB clusters) on `base`, served by qemu-nbd. */
export async function startQemuOverlay(ctx: BenchContext, base: string, overlay: string, fresh = true): Promise<Server> {
  if (fresh) {
    rmSync(overlay, { force: true })
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay])
  }
  const port = await freePort()
  return startServer(
    ctx,
    'qemu-nbd qcow2',
    'qemu-nbd',
    ['-b', '127.0.0.1', '-p', String(port), '-x', 'ov', '-f', 'qcow2', '-t', '-e', '8', '--cache=writeback', overlay],
    port,
    'ov',
  )
}

let profileSeq = 0

export async function startBlocksnap(ctx: BenchContext, dir: string, label = 'blocksnap'): Promise<Server> {
  const port = await freePort()
  // The launcher is a shell script (it sizes the I/O thread pool); it passes BLOCKSNAP_NODE_FLAGS to node.
  const profile = ctx.args.profile
  const profileOptions = profile
    ? `--cpu-prof --cpu-prof-dir=${profile} --cpu-prof-name=${label.replace(/[^A-Za-z0-9]+/g, '_')}-${++profileSeq}.cpuprofile`
    : undefined
  const env: NodeJS.ProcessEnv = { ...process.env, BLOCKSNAP_LOG_LEVEL: 'warn' }
  if (profileOptions !== undefined) env.BLOCKSNAP_NODE_FLAGS = profileOptions
  return startServer(ctx, label, join(ROOT, 'bin', 'blocksnap'), ['serve', dir, '--listen', `127.0.0.1:${port}`], port, dir.split('/').pop() as string, env)
}

/**
 * The first-touch ceiling (bench/ceiling/rand4k-server.ts) over `originPath`, written in
 * place, with a fresh COW at `cowPath`; with the thread pool blocksnap's launcher would give it.
 */
export async function startFirstTouchCeiling(ctx: BenchContext, originPath: string, cowPath: string): Promise<Server> {
  const port = await freePort()
  const pool = String(Math.min(16, Math.max(1, availableParallelism() - 1)))
  return startServer(
    ctx,
    'ceiling 1 snap 4K',
    process.execPath,
    ['--import', 'tsx', join(ROOT, 'bench', 'ceiling', 'rand4k-server.ts'), originPath, cowPath, String(port)],
    port,
    'ceiling',
    { ...process.env, UV_THREADPOOL_SIZE: pool },
  )
}

/** qemu-nbd serving any qemu filename (e.g. `rbd:POOL/IMAGE:conf=FILE`) raw, with its cache off, as blocksnap's gateway does. */
export async function startQemuNbdRaw(ctx: BenchContext, label: string, filename: string): Promise<Server> {
  const port = await freePort()
  return startServer(
    ctx,
    label,
    'qemu-nbd',
    ['-b', '127.0.0.1', '-p', String(port), '-x', 'disk', '-f', 'raw', '-t', '-e', '8', '--cache=none', '--discard=unmap', filename],
    port,
    'disk',
  )
}
