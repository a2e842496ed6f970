/**
 * `serve --on-event CMD`: runs CMD through `sh -c` once per event, the event as one JSON line
 * on its stdin (and its type in $BLOCKSNAP_EVENT).
 *
 * Hooks run one at a time, in event order, off the I/O path: an event is queued and the emitter
 * goes on. The queue is bounded; events that find it full are dropped and counted, and the
 * count is logged when the hook catches up. A hook that fails (non-zero exit, signal, cannot
 * start) is logged with what it wrote on stderr; one that runs longer than the limit is killed
 * (its whole process group) and logged.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import type { Logger } from 'pino'
import type { ServiceEvent } from './service-events.js'

export interface EventHookOptions {
  /** Events waiting beyond the one running; more are dropped. Default 1000. */
  readonly maxQueued?: number
  /** A hook running longer is killed. Default 60 s. */
  readonly timeoutMs?: number
}

/** Most stderr kept from one run for the log. */
const STDERR_BYTES = 2048

export class EventHook {
  private readonly command: string
  private readonly log: Logger
  private readonly maxQueued: number
  private readonly timeoutMs: number
  private readonly queue: string[] = []
  private readonly types: string[] = []
  private dropped = 0
  private running: ChildProcess | null = null
  private loop: Promise<void> | null = null
  private closing = false

  constructor(command: string, log: Logger, options: EventHookOptions = {}) {
    this.command = command
    this.log = log
    this.maxQueued = options.maxQueued ?? 1000
    this.timeoutMs = options.timeoutMs ?? 60_000
  }

  /** Queues `event` for the hook; never waits. */
  push(event: ServiceEvent): void {
    if (this.closing) return
    if (this.queue.length >= this.maxQueued) {
      this.dropped++
      return
    }
    this.queue.push(`${JSON.stringify({ ...event, time: new Date().toISOString() })}\n`)
    this.types.push(event.type)
    this.loop ??= this.drain().finally(() => {
      this.loop = null
    })
  }

  /**
   * Stops taking events and waits up to `graceMs` for the queued ones to run; then the running
   * hook is killed and what is left is dropped (and logged).
   */
  async close(graceMs: number): Promise<void> {
    this.closing = true
    const loop = this.loop
    if (loop === null) return this.reportDropped()
    let timer: NodeJS.Timeout | undefined
    const late = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, graceMs)
    })
    await Promise.race([loop, late])
    clearTimeout(timer)
    if (this.loop !== null) {
      this.dropped += this.queue.length
      this.queue.length = 0
      this.types.length = 0
      this.kill()
      await this.loop
    }
    this.reportDropped()
  }

  private async drain(): Promise<void> {
    for (;;) {
      const line = this.queue.shift()
      const type = this.types.shift()
      if (line === undefined || type === undefined) return
      this.reportDropped()
      await this.run(line, type)
    }
  }

  private reportDropped(): void {
    if (this.dropped === 0) return
    this.log.warn({ event: 'on-event-dropped', droppedEvents: this.dropped }, `--on-event: ${this.dropped} events dropped (the hook fell behind)`)
    this.dropped = 0
  }

  private run(line: string, type: string): Promise<void> {
    return new Promise((resolve) => {
      let child: ChildProcess
      try {
        // Its own process group, so a timeout kills whatever the command started too.
        child = spawn('/bin/sh', ['-c', this.command], {
          stdio: ['pipe', 'ignore', 'pipe'],
          detached: true,
          env: { ...process.env, BLOCKSNAP_EVENT: type },
        })
      } catch (err) {
        this.failed(type, `cannot start: ${(err as Error).message}`, {})
        resolve()
        return
      }
      this.running = child
      let stderr = ''
      child.stderr?.on('data', (d: Buffer) => {
        if (stderr.length < STDERR_BYTES) stderr += d.toString('utf8').slice(0, STDERR_BYTES - stderr.length)
      })
      // A hook that does not read its stdin closes it early: not an error of ours.
      child.stdin?.on('error', () => {})
      child.stdin?.end(line)
      let timedOut = false
      const timer = setTimeout(() => {
        timedOut = true
        this.kill()
      }, this.timeoutMs)
      let settled = false
      const finish = (what: string | null, fields: Record<string, unknown>) => {
        if (settled) return
        settled = true
        clearTimeout(timer)
        this.running = null
        if (what !== null) this.failed(type, what, { ...fields, ...(stderr === '' ? {} : { stderr: stderr.trim() }) })
        resolve()
      }
      child.once('error', (err) => finish(`cannot start: ${err.message}`, {}))
      child.once('close', (code, signal) => {
        if (timedOut) finish(`killed after ${this.timeoutMs} ms`, { timeoutMs: this.timeoutMs })
        else if (code !== 0) finish(signal === null ? `exited with status ${code}` : `killed by ${signal}`, { exitCode: code, signal })
        else finish(null, {})
      })
    })
  }

  private kill(): void {
    const pid = this.running?.pid
    if (pid === undefined) return
    try {
      process.kill(-pid, 'SIGKILL')
    } catch {
      // Already gone.
    }
  }

  private failed(type: string, what: string, fields: Record<string, unknown>): void {
    this.log.warn({ event: 'on-event-failed', hookEvent: type, ...fields }, `--on-event hook for ${type} ${what}`)
  }
}
