/**
 * Where `serve` logs: stderr (a terminal, or the journal under systemd), or `--log-file PATH`,
 * which SIGHUP reopens so logrotate can move it away (nbdkit, nginx and rsyslog do the same).
 */
import { type Logger, pino } from 'pino'
import { SnapError } from '../errors.js'

export interface ServeLog {
  readonly log: Logger
  /** The file being logged to, or null for stderr. */
  readonly file: string | null
  /** Opens `file` by its name again (after logrotate renamed it); a no-op for stderr. */
  reopen(): void
}

export function openServeLog(file: string | undefined): ServeLog {
  const level = process.env.BLOCKSNAP_LOG_LEVEL ?? 'info'
  if (file === undefined) {
    const destination = pino.destination(2)
    // stderr may be a terminal that hung up (SIGHUP): losing log lines must not stop the shutdown.
    destination.on('error', () => {})
    return { log: pino({ name: 'blocksnap', level }, destination), file: null, reopen: () => {} }
  }
  let destination: ReturnType<typeof pino.destination>
  try {
    // Synchronous writes, as on stderr: the last records before an exit are not lost.
    destination = pino.destination({ dest: file, append: true, sync: true })
  } catch (err) {
    throw new SnapError('SNAP_BAD_ARGUMENT', `cannot open the log file ${file}: ${(err as Error).message}`)
  }
  const log = pino({ name: 'blocksnap', level }, destination)
  let reopening = false
  destination.on('ready', () => {
    reopening = false
  })
  // A failed reopen (the directory gone, say) keeps the old descriptor: records go on landing in
  // the renamed file rather than nowhere. Other write errors are dropped, as on stderr: logging
  // them would only fail again.
  destination.on('error', (err: Error) => {
    if (!reopening) return
    reopening = false
    log.error(`cannot reopen the log file ${file}: ${err.message}; still writing to the old one`)
  })
  return {
    log,
    file,
    reopen: () => {
      reopening = true
      destination.reopen()
    },
  }
}

/** SIGHUP reopens the log file for as long as the process lives (handlers do not keep Node alive). */
export function reopenOnHangup(serveLog: ServeLog): void {
  process.on('SIGHUP', () => {
    serveLog.reopen()
    serveLog.log.info(`SIGHUP: reopened the log file ${serveLog.file}`)
  })
}
