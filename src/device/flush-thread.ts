/**
 * fdatasync(2) on threads of its own, not on libuv's pool.
 *
 * Every commit of a persistent snapshot waits for the COW to be made durable twice (data before
 * the entries that point at it, then the entries; a stream of commits shares each flush between
 * two batches), and with several snapshots each COW file is flushed in turn. A flush waits for
 * the device, for milliseconds when much is dirty. On libuv's pool
 * (one thread on a 2-core machine, because more measured slower for plain writes) every read
 * and write queued behind a flush waited with it: with eight 4 KiB-chunk snapshots, 1 MiB
 * first-touch writes ran at half the rate they reach with flushes off the pool. A flush costs a
 * message each way to a worker thread, tens of microseconds against the flush's own hundreds.
 *
 * One worker runs the flushes in turn (two measured slower: 1 MiB first touch with four
 * snapshots 67-77 against 89-100 MiB/s). It starts on first use, stays while the process lives,
 * and never keeps the process alive while idle. A worker that dies fails its flushes with an I/O
 * error and is replaced by the next flush.
 */
import { Worker } from 'node:worker_threads'

/** Completion of a flush: null, or the error with its errno code. */
export type FlushDone = (err: NodeJS.ErrnoException | null) => void

// CommonJS, evaluated in the worker: the package's own modules are ES modules behind a build
// step, and this is the whole of the worker's work.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads')
const { fdatasyncSync } = require('node:fs')
parentPort.on('message', (m) => {
  try {
    fdatasyncSync(m.fd)
    parentPort.postMessage({ id: m.id, code: null, message: null })
  } catch (e) {
    parentPort.postMessage({ id: m.id, code: e.code || 'EIO', message: e.message })
  }
})
`

interface Reply {
  readonly id: number
  readonly code: string | null
  readonly message: string | null
}

class FlushWorker {
  private readonly worker: Worker
  private readonly waiting = new Map<number, FlushDone>()
  private nextId = 0
  private dead = false

  constructor(onDeath: (w: FlushWorker) => void) {
    // No inherited node flags: --input-type=module would make the source an ES module, and
    // --cpu-prof or --import would load and measure things the worker has no part in.
    this.worker = new Worker(WORKER_SOURCE, { eval: true, execArgv: [] })
    this.worker.on('message', (reply: Reply) => this.replied(reply))
    const die = (reason: string): void => {
      if (this.dead) return
      this.dead = true
      onDeath(this)
      const waiting = [...this.waiting.values()]
      this.waiting.clear()
      for (const done of waiting) done(Object.assign(new Error(`flush thread ${reason}`), { code: 'EIO' }))
    }
    this.worker.on('error', (err) => die(`failed: ${err.message}`))
    this.worker.on('exit', (code) => die(`exited with code ${code}`))
    // After the listeners: adding a 'message' listener refs the worker again, which would hold
    // the process open until a flush's own ref and unref.
    this.worker.unref()
  }

  flush(fd: number, done: FlushDone): void {
    // Referenced only while a flush is under way: an idle worker never holds the process open.
    if (this.waiting.size === 0) this.worker.ref()
    const id = this.nextId++
    this.waiting.set(id, done)
    this.worker.postMessage({ id, fd })
  }

  private replied(reply: Reply): void {
    const done = this.waiting.get(reply.id)
    if (done === undefined) return
    this.waiting.delete(reply.id)
    if (this.waiting.size === 0) this.worker.unref()
    done(reply.code === null ? null : Object.assign(new Error(reply.message ?? 'fdatasync failed'), { code: reply.code }))
  }
}

let worker: FlushWorker | null = null

/**
 * fdatasync(fd) on the flush thread; `done` is called on the main thread, never synchronously.
 * The caller keeps `fd` open until then.
 */
export function fdatasyncOffPool(fd: number, done: FlushDone): void {
  worker ??= new FlushWorker((dead) => {
    if (worker === dead) worker = null
  })
  worker.flush(fd, done)
}
