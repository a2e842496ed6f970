/**
 * The I/O side of the soak: lanes that keep requests in flight on one NBD connection and check
 * every answer against the view's model, and full-view scans.
 */
import { Random } from '../test/support/random.js'
import { Cmd, ESHUTDOWN, FLAG_FUA, FLAG_NO_HOLE, type NbdClient, type NbdReply, TransmissionFlags } from './nbd-client.js'
import type { View } from './view.js'

export type Kind = 'read' | 'write' | 'zeroes' | 'trim' | 'flush'
const KINDS: readonly Kind[] = ['read', 'write', 'zeroes', 'trim', 'flush']

export class Stats {
  readonly requests: Record<Kind, number> = { read: 0, write: 0, zeroes: 0, trim: 0, flush: 0 }
  readonly bytes: Record<Kind, number> = { read: 0, write: 0, zeroes: 0, trim: 0, flush: 0 }
  readsVerified = 0
  expectedShutdowns = 0
  readonly errors: string[] = []
  lastProgressMs = Date.now()
  private writeStamp = 0

  error(message: string): void {
    this.errors.push(message)
    if (this.errors.length <= 20) process.stderr.write(`soak: ERROR: ${message}\n`)
  }

  nextStamp(): number {
    return ++this.writeStamp
  }

  done(kind: Kind, length: number): void {
    this.requests[kind]++
    this.bytes[kind] += length
    this.lastProgressMs = Date.now()
  }

  get totalRequests(): number {
    return KINDS.reduce((n, k) => n + this.requests[k], 0)
  }
}

/** Where requests go: half of them into a small hot zone, so requests meet in the same chunks. */
function pickRange(rng: Random, sizeBytes: number, kind: Kind): { offset: number; length: number } {
  const zone = rng.chance(0.5) ? Math.min(sizeBytes, 4 * 1024 * 1024) : sizeBytes
  const shape = rng.next()
  let offset: number
  let length: number
  if (shape < 0.78) {
    offset = 4096 * rng.int(zone / 4096)
    length = 4096 * (1 + rng.int(64))
  } else if (shape < 0.88) {
    offset = 512 * rng.int(zone / 512)
    length = 512 * (1 + rng.int(128))
  } else if (shape < 0.98) {
    // Byte granular (the server advertises a minimum block size of 1).
    offset = rng.int(zone)
    length = 1 + rng.int(20_000)
  } else {
    offset = 65536 * rng.int(sizeBytes / 65536)
    length = (kind === 'read' ? 4 : 2) * 1024 * 1024
  }
  return { offset, length: Math.max(1, Math.min(length, sizeBytes - offset)) }
}

function pickKind(rng: Random): Kind {
  const x = rng.int(100)
  if (x < 46) return 'read'
  if (x < 82) return 'write'
  if (x < 89) return 'zeroes'
  if (x < 94) return 'trim'
  return 'flush'
}

/** Data no other write carries: the write's stamp and each word's own offset. */
export function stampedPayload(stamp: number, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length)
  const words = new Uint32Array(out.buffer, 0, length >>> 2)
  const base = (Math.imul(stamp, 0x9e3779b1) ^ offset) >>> 0
  for (let i = 0; i < words.length; i++) words[i] = (base + i * 4) >>> 0
  for (let i = words.length * 4; i < length; i++) out[i] = (stamp + i) & 0xff
  return out
}

function describeMismatch(view: View, offset: number, got: Uint8Array): string {
  const want = view.model.subarray(offset, offset + got.length)
  let first = -1
  let count = 0
  for (let i = 0; i < got.length; i++) {
    if (got[i] !== want[i]) {
      if (first === -1) first = i
      count++
    }
  }
  const at = offset + first
  const hex = (b: Uint8Array) => Buffer.from(b.subarray(first, first + 16)).toString('hex')
  return `${view.exportName}: read ${offset}+${got.length} differs from the model in ${count} bytes, first at ${at}: got ${hex(got)}, want ${hex(want)}`
}

/** Checks a successful read against the model; true if it matches. */
function verifyRead(view: View, offset: number, data: Buffer, stats: Stats): boolean {
  const want = view.model.subarray(offset, offset + data.length)
  if (Buffer.compare(data, want) === 0) {
    stats.readsVerified++
    return true
  }
  stats.error(describeMismatch(view, offset, data))
  return false
}

export interface LaneContext {
  readonly stats: Stats
  /** The whole soak is stopping. */
  stopped(): boolean
}

/**
 * Keeps one request at a time in flight (a connection runs several lanes). Runs until the view
 * stops, or, once the view is withdrawn, until the server has answered ESHUTDOWN.
 */
export async function runLane(view: View, client: NbdClient, rng: Random, ctx: LaneContext): Promise<void> {
  const { stats } = ctx
  while (!view.stopping && !ctx.stopped()) {
    let kind = pickKind(rng)
    // Only what the export advertises (snapshots do not offer TRIM).
    if (kind === 'trim' && !(client.transmissionFlags & TransmissionFlags.SEND_TRIM)) kind = 'zeroes'
    const { offset, length } = kind === 'flush' ? { offset: 0, length: 0 } : pickRange(rng, view.sizeBytes, kind)
    const write = kind !== 'read' && kind !== 'flush'
    let blocked: Promise<void> | null
    while (kind !== 'flush' && (blocked = view.blocked(write)) !== null) await blocked
    if (view.stopping || ctx.stopped()) break
    const lease = kind === 'flush' ? null : await view.lock.acquire(offset, offset + length, write)
    const sentWithdrawn = view.state === 'withdrawn'
    let payload: Uint8Array | null = null
    let reply: NbdReply
    try {
      switch (kind) {
        case 'read':
          reply = await client.request(Cmd.READ, offset, length)
          break
        case 'write':
          payload = stampedPayload(stats.nextStamp(), offset, length)
          reply = await client.request(Cmd.WRITE, offset, length, { payload, flags: rng.chance(0.1) ? FLAG_FUA : 0 })
          break
        case 'zeroes':
          reply = await client.request(Cmd.WRITE_ZEROES, offset, length, { flags: rng.chance(0.5) ? FLAG_NO_HOLE : 0 })
          break
        case 'trim':
          reply = await client.request(Cmd.TRIM, offset, length)
          break
        case 'flush':
          reply = await client.request(Cmd.FLUSH, 0, 0)
          break
      }
    } catch (err) {
      if (lease) view.lock.release(lease)
      if (view.state !== 'live') {
        stats.expectedShutdowns++
        return // the server may close connections to an export that is gone
      }
      stats.error(`${view.exportName}: ${kind} ${offset}+${length}: ${(err as Error).message}`)
      return
    }
    if (reply.error === 0) {
      if (sentWithdrawn) stats.error(`${view.exportName}: ${kind} ${offset}+${length} sent after the export was withdrawn succeeded (want ESHUTDOWN)`)
      else {
        stats.done(kind, length)
        if (kind === 'read') verifyRead(view, offset, reply.data, stats)
        else if (kind === 'write') view.model.set(payload as Uint8Array, offset)
        else if (write) view.model.fill(0, offset, offset + length) // zeroes, and trim reads as zeros
      }
    } else if (reply.error === ESHUTDOWN && view.state !== 'live') {
      stats.expectedShutdowns++
      if (lease) view.lock.release(lease)
      return
    } else {
      stats.error(`${view.exportName}: ${kind} ${offset}+${length} failed with NBD errno ${reply.error}`)
    }
    if (lease) view.lock.release(lease)
  }
}

export const SCAN_PIECE_BYTES = 1024 * 1024
const SCAN_PIECES_IN_FLIGHT = 4

/**
 * Reads the whole view through `client`, a few pieces at a time, each compared with the model
 * as it is when the piece is answered; true if all of it matched. Pauses of the view hold it
 * back like any other read.
 */
export async function scanView(view: View, client: NbdClient, stats: Stats): Promise<boolean> {
  let next = 0
  let clean = true
  const worker = async () => {
    while (clean && next < view.sizeBytes) {
      const offset = next
      const length = Math.min(SCAN_PIECE_BYTES, view.sizeBytes - offset)
      next += length
      let blocked: Promise<void> | null
      while ((blocked = view.blocked(false)) !== null) await blocked
      const lease = await view.lock.acquire(offset, offset + length, false)
      try {
        const reply = await client.request(Cmd.READ, offset, length)
        if (reply.error !== 0) {
          stats.error(`${view.exportName}: scan read ${offset}+${length} failed with NBD errno ${reply.error}`)
          clean = false
        } else {
          stats.done('read', length)
          if (!verifyRead(view, offset, reply.data, stats)) clean = false
        }
      } catch (err) {
        stats.error(`${view.exportName}: scan read ${offset}+${length}: ${(err as Error).message}`)
        clean = false
      } finally {
        view.lock.release(lease)
      }
    }
  }
  await Promise.all(Array.from({ length: SCAN_PIECES_IN_FLIGHT }, worker))
  return clean
}

export { Random }
