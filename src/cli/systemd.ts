/**
 * The two halves of the systemd service protocol that `serve` speaks: sockets passed by socket
 * activation (sd_listen_fds(3)) and the readiness notification (sd_notify(3)).
 */
import { spawn } from 'node:child_process'

/** The first descriptor systemd passes (SD_LISTEN_FDS_START). */
const FIRST_PASSED_FD = 3

export interface PassedSocket {
  readonly fd: number
  /** Its FileDescriptorName= (LISTEN_FDNAMES), or systemd's default name. */
  readonly name: string
}

/**
 * The listening sockets systemd handed this process: fds 3.. when LISTEN_PID names this process,
 * none otherwise. Like sd_listen_fds(1), it clears LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES, so
 * processes `serve` starts (hooks, systemd-notify) do not take the sockets as theirs.
 */
export function takePassedSockets(env: NodeJS.ProcessEnv = process.env, pid: number = process.pid): PassedSocket[] {
  const listenPid = env.LISTEN_PID
  const listenFds = env.LISTEN_FDS
  const names = env.LISTEN_FDNAMES?.split(':') ?? []
  delete env.LISTEN_PID
  delete env.LISTEN_FDS
  delete env.LISTEN_FDNAMES
  if (listenPid === undefined || listenFds === undefined || !/^\d+$/.test(listenPid) || Number(listenPid) !== pid) return []
  if (!/^\d+$/.test(listenFds)) return []
  const count = Number(listenFds)
  return Array.from({ length: count }, (_, i) => ({ fd: FIRST_PASSED_FD + i, name: names[i] || 'unknown' }))
}

export interface NotifyLog {
  info(msg: string): void
  warn(msg: string): void
}

/**
 * Tells systemd (Type=notify) that the service is up, when NOTIFY_SOCKET asks for it. Node has no
 * Unix datagram sockets, so systemd-notify(1) sends the message for this process (`--pid`);
 * the unit needs NotifyAccess=all for a message from a child. By default systemd-notify waits
 * until systemd has read it, so the child's exit cannot outrun the notification. A failure is
 * logged, not fatal: the server is up either way. NOTIFY_SOCKET is cleared afterwards, so
 * commands `serve` runs later cannot report for it.
 */
export async function notifyReady(status: string, log: NotifyLog, env: NodeJS.ProcessEnv = process.env): Promise<void> {
  const socket = env.NOTIFY_SOCKET
  if (socket === undefined || socket === '') return
  delete env.NOTIFY_SOCKET
  const args = ['--ready', `--pid=${process.pid}`, `--status=${status}`]
  const outcome = await new Promise<{ code: number | null; error?: NodeJS.ErrnoException; stderr: string }>((resolve) => {
    const child = spawn('systemd-notify', args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...env, NOTIFY_SOCKET: socket } })
    let stderr = ''
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString('utf8')
    })
    child.once('error', (error: NodeJS.ErrnoException) => resolve({ code: null, error, stderr }))
    child.once('close', (code) => resolve({ code, stderr }))
  })
  if (outcome.error?.code === 'ENOENT') {
    log.warn('NOTIFY_SOCKET is set but systemd-notify is not installed: readiness not reported (install systemd, or use Type=simple)')
  } else if (outcome.error !== undefined || outcome.code !== 0) {
    const why = outcome.error?.message ?? (outcome.stderr.trim() || `exit ${outcome.code}`)
    log.warn(`systemd-notify --ready failed: ${why}`)
  } else {
    log.info(`readiness reported to systemd (${socket})`)
  }
}
