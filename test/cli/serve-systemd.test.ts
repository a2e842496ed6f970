/**
 * `blocksnap serve` as a systemd service (issue 19, item 4): it serves on the sockets socket
 * activation passes (systemd-socket-activate, the real peer, and nbdinfo through them), reports
 * readiness on NOTIFY_SOCKET once it serves (received by a Python datagram socket, as systemd
 * would), and with --log-file SIGHUP reopens the log (logrotate) instead of stopping. The
 * shipped units pass systemd-analyze and run options serve has.
 */
import assert from 'node:assert/strict'
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdir, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import { PidFile } from '../../src/cli/pid-file.js'
import { takePassedSockets } from '../../src/cli/systemd.js'
import { Volume } from '../../src/volume/volume.js'
import { freePort } from '../support/free-port.js'
import { requireTools, run, runOk } from '../support/nbd-tools.js'
import { BIN, REPO, cli, ok } from './helpers.js'

const TIMEOUT = 60_000
const PYTHON = '/usr/bin/python3'

let T = ''
let vol = ''
const children = new Set<ChildProcess>()

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'bs-systemd-'))
  vol = join(T, 'vol')
  await Volume.create(vol, { sizeBytes: 1024 * 1024 })
})

after(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL')
  await rm(T, { recursive: true, force: true })
})

/** A child process with its stdout and stderr collected as text. */
class Child {
  readonly process: ChildProcess
  readonly exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  stdout = ''
  stderr = ''

  constructor(command: string, args: readonly string[], env: NodeJS.ProcessEnv = {}) {
    this.process = spawn(command, args, { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, BLOCKSNAP_LOG_LEVEL: 'info', ...env } })
    children.add(this.process)
    // 'close': the streams are read to the end too.
    this.exit = new Promise((resolve) => this.process.once('close', (code, signal) => resolve({ code, signal })))
    this.process.stdout?.on('data', (d: Buffer) => {
      this.stdout += d.toString('utf8')
    })
    this.process.stderr?.on('data', (d: Buffer) => {
      this.stderr += d.toString('utf8')
    })
  }

  get pid(): number {
    return this.process.pid as number
  }

  /** Resolves once `read()` matches; fails with everything seen if the child exits first or it takes too long. */
  async waitFor(what: string, read: () => Promise<boolean> | boolean, timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs
    let exited = false
    void this.exit.then(() => {
      exited = true
    })
    for (;;) {
      if (await read()) return
      if (exited || Date.now() > deadline) {
        if (await read()) return
        assert.fail(`${exited ? 'exited' : 'timed out'} before ${what}\nstdout: ${this.stdout}\nstderr: ${this.stderr}`)
      }
      await sleep(50)
    }
  }
}

const fileText = (p: string) => readFile(p, 'utf8').catch(() => '')

describe('serve under systemd', () => {
  it('socket activation: serves on the passed TCP and Unix sockets (systemd-socket-activate, nbdinfo)', { timeout: TIMEOUT }, async () => {
    await requireTools('nbdinfo', 'systemd-socket-activate')
    const sock = join(T, 'activated.sock')
    const port = await freePort()
    // No --listen: the default 127.0.0.1:10809 must not be bound either.
    const s = new Child('systemd-socket-activate', ['-l', sock, '-l', `127.0.0.1:${port}`, '--fdname=nbd-unix:nbd-tcp', process.execPath, BIN, 'serve', vol])
    await s.waitFor('systemd-socket-activate listens', () => s.stderr.includes(`Listening on 127.0.0.1:${port}`))
    // The first connection makes systemd-socket-activate exec blocksnap, which takes it over.
    const unix = await runOk('nbdinfo', ['--json', `nbd+unix:///vol?socket=${sock}`], { timeoutMs: 30_000 })
    assert.equal(JSON.parse(unix.stdout).exports[0]['export-size'], 1024 * 1024)
    const tcp = await runOk('nbdinfo', ['--json', `nbd://127.0.0.1:${port}/vol`], { timeoutMs: 30_000 })
    assert.equal(JSON.parse(tcp.stdout).exports[0]['export-name'], 'vol')
    assert.match(s.stderr, /"msg":"serving vol on the sockets systemd passed: nbd-unix \(fd 3\), nbd-tcp \(fd 4\)/)
    assert.doesNotMatch(s.stderr, /10809/)
    process.kill(s.pid, 'SIGTERM') // exec'd: the same PID is blocksnap now
    assert.deepEqual(await s.exit, { code: 0, signal: null }, s.stderr)
    assert.match(s.stderr, /"msg":"stopped"/)
  })

  it('readiness: READY=1 with its PID on NOTIFY_SOCKET once it serves', { timeout: TIMEOUT }, async () => {
    await requireTools('nbdinfo', 'systemd-notify')
    const notifySocket = join(T, 'notify.sock')
    // systemd's side: a Unix datagram socket printing each message; it closes the fd that
    // systemd-notify's barrier passes, which is how systemd acknowledges.
    const receiver = new Child(PYTHON, [
      '-c',
      `import socket, sys, os, array
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print("bound", flush=True)
while True:
    msg, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(64))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % 4])
            for fd in fds:
                os.close(fd)
    print(repr(msg.decode()), flush=True)
`,
      notifySocket,
    ])
    await receiver.waitFor('the receiver binds', () => receiver.stdout.includes('bound'))
    const port = await freePort()
    const s = new Child(process.execPath, [BIN, 'serve', vol, '--listen', `127.0.0.1:${port}`], { NOTIFY_SOCKET: notifySocket })
    await receiver.waitFor('READY=1', () => receiver.stdout.includes('READY=1'))
    // Ready means serving: a client gets in without waiting for anything else.
    await runOk('nbdinfo', [`nbd://127.0.0.1:${port}/vol`], { timeoutMs: 10_000 })
    const ready = receiver.stdout.split('\n').find((l) => l.includes('READY=1')) as string
    assert.match(ready, new RegExp(`MAINPID=${s.pid}\\b`))
    assert.match(ready, /STATUS=serving vol/)
    process.kill(s.pid, 'SIGTERM')
    assert.deepEqual(await s.exit, { code: 0, signal: null }, s.stderr)
    assert.match(s.stderr, /"msg":"readiness reported to systemd/)
    assert.doesNotMatch(s.stderr, /"level":(40|50|60)/, s.stderr)
    receiver.process.kill('SIGTERM')
    await receiver.exit
  })

  it('--log-file: SIGHUP reopens the log at its path (logrotate) and does not stop; SIGTERM stops', { timeout: TIMEOUT }, async () => {
    await requireTools('nbdinfo')
    const logFile = join(T, 'serve.log')
    const rotated = `${logFile}.1`
    const port = await freePort()
    const s = new Child(process.execPath, [BIN, 'serve', vol, '--listen', `127.0.0.1:${port}`, '--log-file', logFile])
    await s.waitFor('serving is logged to the file', async () => (await fileText(logFile)).includes('"msg":"serving vol'))
    await rename(logFile, rotated)
    process.kill(s.pid, 'SIGHUP')
    await s.waitFor('a new log file', async () => (await fileText(logFile)).includes('"msg":"SIGHUP: reopened the log file'))
    // Still serving after the SIGHUP.
    await runOk('nbdinfo', [`nbd://127.0.0.1:${port}/vol`], { timeoutMs: 10_000 })
    process.kill(s.pid, 'SIGTERM')
    assert.deepEqual(await s.exit, { code: 0, signal: null }, s.stderr)
    assert.equal(s.stderr, '', 'nothing on stderr with a log file')
    const old = await fileText(rotated)
    const current = await fileText(logFile)
    assert.match(old, /"msg":"serving vol/)
    assert.doesNotMatch(old, /SIGHUP|stopped/, 'nothing lands in the rotated file after the reopen')
    assert.match(current, /"msg":"SIGTERM: stopping"/)
    assert.match(current, /"msg":"stopped"/)
    assert.doesNotMatch(current, /SIGHUP: stopping/)
  })

  it('the shipped units pass systemd-analyze verify; ExecStart uses options serve has', { timeout: TIMEOUT }, async () => {
    await requireTools('systemd-analyze')
    const units = join(T, 'units')
    await mkdir(units)
    const service = await readFile(join(REPO, 'contrib', 'systemd', 'blocksnap@.service'), 'utf8')
    const execStart = /^ExecStart=blocksnap serve (.*)$/m.exec(service)?.[1]
    assert.ok(execStart, 'ExecStart runs blocksnap serve')
    // systemd looks the command up in its own search path: point it at this checkout.
    await writeFile(join(units, 'blocksnap@test.service'), service.replace('ExecStart=blocksnap ', `ExecStart=${join(REPO, 'bin', 'blocksnap')} `))
    await writeFile(join(units, 'blocksnap@test.socket'), await readFile(join(REPO, 'contrib', 'systemd', 'blocksnap@.socket')))
    const verified = await run('systemd-analyze', ['verify', join(units, 'blocksnap@test.socket'), join(units, 'blocksnap@test.service')])
    assert.deepEqual([verified.code, verified.stderr, verified.stdout], [0, '', ''], 'systemd-analyze verify is silent')
    const help = ok(await cli(['serve', '--help']), 'serve --help').stdout.toString()
    for (const option of execStart.match(/--[a-z-]+/g) ?? []) assert.match(help, new RegExp(`${option}\\b`), `serve has ${option}`)
  })
})

describe('the pieces, in process', () => {
  it('passed sockets: only when LISTEN_PID names this process; the variables are cleared either way', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: '4242', LISTEN_FDS: '3', LISTEN_FDNAMES: 'nbd::tcp', OTHER: 'kept' }
    assert.deepEqual(takePassedSockets(env, 4242), [
      { fd: 3, name: 'nbd' },
      { fd: 4, name: 'unknown' },
      { fd: 5, name: 'tcp' },
    ])
    assert.deepEqual(env, { OTHER: 'kept' }, 'children do not inherit them')
    // Meant for another process (a parent that exec'd without clearing them): not ours to serve.
    const inherited: NodeJS.ProcessEnv = { LISTEN_PID: '4241', LISTEN_FDS: '1' }
    assert.deepEqual(takePassedSockets(inherited, 4242), [])
    assert.deepEqual(inherited, {})
    assert.deepEqual(takePassedSockets({ LISTEN_PID: '4242', LISTEN_FDS: 'x' }, 4242), [])
    assert.deepEqual(takePassedSockets({}, 4242), [])
  })

  it('the PID file is removed only while it still holds this PID', async () => {
    const path = join(T, 'unit.pid')
    const mine = await PidFile.write(path, 4242)
    assert.equal(await readFile(path, 'utf8'), '4242\n')
    await PidFile.write(path, 4343) // another server took the path since
    await mine.remove()
    assert.equal(await readFile(path, 'utf8'), '4343\n')
    await rm(path)
    await assert.rejects(PidFile.write(join(T, 'no-such-dir', 'x.pid')), /cannot write the PID file .*no-such-dir/)
  })
})
