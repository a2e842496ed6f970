/**
 * Runs the real NBD client tools (libnbd's nbdinfo/nbdcopy/nbdsh, qemu-img/qemu-io, fio) as
 * child processes against an in-process server. Always asynchronous: a synchronous exec would
 * block the event loop the server needs to answer the very client being waited for.
 */
import { execFile } from 'node:child_process'
import { access, constants, mkdir, readFile, writeFile } from 'node:fs/promises'
import { delimiter, join } from 'node:path'

export interface RunResult {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

/** Debian's python3 may be shadowed (pyenv); nbdsh must find the one with the nbd module. */
const TOOL_ENV = { ...process.env, PATH: `/usr/bin${delimiter}${process.env.PATH ?? ''}`, LIBNBD_DEBUG: '0' }

const PACKAGES: Record<string, string> = {
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdsh: 'python3-libnbd',
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  fio: 'fio',
  openssl: 'openssl',
}

async function onPath(tool: string): Promise<boolean> {
  for (const dir of TOOL_ENV.PATH.split(delimiter)) {
    try {
      await access(join(dir, tool), constants.X_OK)
      return true
    } catch {
      // keep looking
    }
  }
  return false
}

/** Fails (never skips) with an install hint when a tool is missing: CI is expected to have them. */
export async function requireTools(...tools: string[]): Promise<void> {
  const missing: string[] = []
  for (const tool of tools) if (!(await onPath(tool))) missing.push(tool)
  if (missing.length > 0) {
    const packages = [...new Set(missing.map((t) => PACKAGES[t] ?? t))].join(' ')
    throw new Error(`missing NBD interop tool(s): ${missing.join(', ')}; install with: apt-get install -y ${packages}`)
  }
}

export function run(command: string, args: readonly string[], options: { timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
  const started = Date.now()
  return new Promise((resolve) => {
    const child = execFile(
      command,
      args,
      { env: TOOL_ENV, timeout: options.timeoutMs ?? 60_000, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0
        if (process.env.NBD_TEST_TIMING === '1') process.stderr.write(`[${Date.now() - started} ms] ${command} ${args.join(' ').slice(0, 120)}\n`)
        resolve({ code, stdout, stderr: error && code === -1 ? `${stderr}\n${error.message}` : stderr })
      },
    )
    if (options.input !== undefined) child.stdin?.end(options.input)
  })
}

/** Runs and insists on exit code 0, showing the tool's output otherwise. */
export async function runOk(command: string, args: readonly string[], options: { timeoutMs?: number } = {}): Promise<RunResult> {
  const result = await run(command, args, options)
  if (result.code !== 0) {
    throw new Error(`${command} ${args.join(' ')} exited ${result.code}\nstdout: ${result.stdout}\nstderr: ${result.stderr}`)
  }
  return result
}

/** nbdsh with a Python script; `-u URI` connects first unless uri is null. */
export function nbdsh(uri: string | null, script: string, extraArgs: readonly string[] = []): Promise<RunResult> {
  return runOk('nbdsh', [...extraArgs, ...(uri === null ? [] : ['-u', uri]), '-c', script])
}

/** What fio's crc32c write-then-verify job reports (the callers assert on it). */
export interface FioVerifyReport {
  readonly error: number
  readonly writeBytes: number
  readonly readBytes: number
}

/**
 * fio's nbd engine against `uri`: random 4 KiB writes with crc32c checksums over
 * [offset, offset+size), then every block read back and verified by fio itself.
 */
export async function fioVerify(
  uri: string,
  options: { iodepth: number; size: string; offset?: string; timeoutMs: number },
): Promise<FioVerifyReport> {
  const result = await runOk(
    'fio',
    [
      '--name=verify', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', `--iodepth=${options.iodepth}`,
      ...(options.offset !== undefined ? [`--offset=${options.offset}`] : []),
      `--size=${options.size}`, '--verify=crc32c', '--do_verify=1', '--verify_state_save=0', '--output-format=json',
    ],
    { timeoutMs: options.timeoutMs },
  )
  // fio prints a line about the NBD connection before its JSON.
  const job = JSON.parse(result.stdout.slice(result.stdout.indexOf('{'))).jobs[0]
  return { error: job.error, writeBytes: job.write.io_bytes, readBytes: job.read.io_bytes }
}

/**
 * Python for nbdsh: `t(name, fn)` prints "NAME ok" or "NAME ERRNO", so a script can probe
 * requests that should fail without the first failure ending it.
 */
export const NBDSH_TRY = `
def t(name, fn):
    try:
        fn(); print(name, "ok")
    except nbd.Error as e:
        print(name, e.errno)
`

/**
 * Makes `dir` a PKI directory for one self-signed localhost certificate: server-cert.pem and
 * server-key.pem for the server, and ca-cert.pem, which libnbd's tls-certificates wants (the
 * self-signed certificate is its own CA).
 */
export async function makeSelfSignedPki(dir: string): Promise<void> {
  await mkdir(dir)
  await runOk('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-keyout', join(dir, 'server-key.pem'), '-out', join(dir, 'server-cert.pem'),
  ])
  await writeFile(join(dir, 'ca-cert.pem'), await readFile(join(dir, 'server-cert.pem')))
}
