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
  'systemd-socket-activate': 'systemd',
  'systemd-notify': 'systemd',
  'systemd-analyze': 'systemd',
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

/** A CA, a server certificate it signed, and client certificate directories in libnbd/qemu layout. */
export interface CaPki {
  /** The server's files: server-cert.pem and server-key.pem (for localhost and 127.0.0.1), ca-cert.pem. */
  readonly serverCert: string
  readonly serverKey: string
  readonly caCert: string
  /**
   * Client certificate directories for libnbd's tls-certificates=DIR and qemu's
   * tls-creds-x509 dir=DIR: each holds ca-cert.pem (to verify the server) and, except
   * noCertDir, client-cert.pem and client-key.pem.
   */
  readonly clientDir: string // a client certificate the CA signed
  readonly noCertDir: string // no client certificate
  readonly selfSignedDir: string // a self-signed client certificate
  readonly otherCaDir: string // a client certificate another CA signed
}

/**
 * The impostors carry the real CA's name (as subject, or as issuer), so clients that only send a
 * certificate whose issuer the server names (gnutls) send them, and the server must check the
 * signature rather than the name.
 */
const CA_SUBJECT = '/CN=blocksnap test CA'

const PKI_CONFIG = `[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
`

/** Makes `dir` a small PKI (EC P-256 keys, valid two days) with openssl; see CaPki. */
export async function makeCaPki(dir: string): Promise<CaPki> {
  await mkdir(dir)
  const config = join(dir, 'openssl.cnf')
  await writeFile(config, PKI_CONFIG)
  const issue = async (name: string, subject: string, extensions: string, issuer?: string) => {
    await runOk('openssl', [
      'req', '-config', config, '-x509', '-extensions', extensions, '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
      '-nodes', '-days', '2', '-subj', subject, '-keyout', join(dir, `${name}-key.pem`), '-out', join(dir, `${name}-cert.pem`),
      ...(issuer ? ['-CA', join(dir, `${issuer}-cert.pem`), '-CAkey', join(dir, `${issuer}-key.pem`)] : []),
    ])
  }
  await issue('ca', CA_SUBJECT, 'ca')
  await issue('other-ca', CA_SUBJECT, 'ca')
  await issue('server', '/CN=localhost', 'server', 'ca')
  await issue('client', '/CN=alice', 'client', 'ca')
  await issue('self-signed', CA_SUBJECT, 'client')
  await issue('other-client', '/CN=eve', 'client', 'other-ca')
  const caCert = await readFile(join(dir, 'ca-cert.pem'))
  const clientDir = async (name: string, certName?: string) => {
    const d = join(dir, name)
    await mkdir(d)
    await writeFile(join(d, 'ca-cert.pem'), caCert)
    if (certName !== undefined) {
      await writeFile(join(d, 'client-cert.pem'), await readFile(join(dir, `${certName}-cert.pem`)))
      await writeFile(join(d, 'client-key.pem'), await readFile(join(dir, `${certName}-key.pem`)))
    }
    return d
  }
  return {
    serverCert: join(dir, 'server-cert.pem'),
    serverKey: join(dir, 'server-key.pem'),
    caCert: join(dir, 'ca-cert.pem'),
    clientDir: await clientDir('client', 'client'),
    noCertDir: await clientDir('no-cert'),
    selfSignedDir: await clientDir('self-signed-client', 'self-signed'),
    otherCaDir: await clientDir('other-ca-client', 'other-client'),
  }
}
