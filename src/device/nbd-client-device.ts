/**
 * A BlockDevice over NBD: an export on nbdkit, qemu-nbd (which reaches Ceph RBD, iSCSI, …) or
 * another blocksnap, addressed by an NBD URI (see nbd/nbd-uri.ts).
 *
 * Design notes:
 * - Mapping to the contract: read -> READ, write -> WRITE (with FUA when the server offers it,
 *   else WRITE then FLUSH), flush -> FLUSH, discard -> WRITE_ZEROES that may punch holes (NBD's
 *   TRIM promises nothing about what reads back, the contract promises zeros); trim() is the
 *   advisory TRIM for callers that do not care.
 * - Block-size constraints: requests are split at the server's maximum payload, and when its
 *   minimum block is above 1 an unaligned request becomes an aligned one with read-modify-write
 *   at the edges. Writes then hold their aligned range, so a read-modify-write never puts back
 *   stale bytes over a concurrent write to the same block.
 * - Pipelining: each connection carries at most `maxInFlightPerConnection` requests; the rest
 *   wait in one queue in submission order.
 * - Multi-conn: with `connections > 1` and a server that advertises CAN_MULTI_CONN, requests
 *   spread over several connections (least loaded first). FLUSH on any of them covers writes
 *   acknowledged on all of them, which is exactly what CAN_MULTI_CONN promises.
 * - Reconnection: when a connection dies, the requests it had in flight go back to the front of
 *   the queue (every NBD request is idempotent) and the connection is re-established with
 *   exponential backoff. After `attempts` failed tries every waiting request fails with SNAP_IO
 *   "NBD server URI unreachable after N attempts". The next request starts a new round, so the
 *   device recovers when the server does.
 */
import { SnapError, ioError, notSupported } from '../errors.js'
import { Command, CommandFlag, NbdErrno, TransmissionFlag, nameOfCommand, nameOfErrno } from '../protocol/nbd/constants.js'
import { type Clock, systemClock } from '../util/clock.js'
import { BaseBlockDevice, type DeviceCapabilities } from './block-device.js'
import {
  NbdClientConnection,
  type NbdClientRequest,
  type NbdExportInfo,
  type NbdReplyError,
} from './nbd/nbd-client-connection.js'
import { loadClientTls } from './nbd/nbd-client-tls.js'
import { parseNbdUri, type NbdUri } from './nbd/nbd-uri.js'
import { RangeLock } from './nbd/range-lock.js'
import type tls from 'node:tls'

export interface NbdReconnectPolicy {
  /** Connection attempts after a loss before waiting requests fail. */
  readonly attempts: number
  /** Delay before the first attempt; it doubles per attempt up to maxDelayMs. */
  readonly initialDelayMs: number
  readonly maxDelayMs: number
}

export const DEFAULT_RECONNECT: NbdReconnectPolicy = { attempts: 8, initialDelayMs: 100, maxDelayMs: 5000 }

export interface NbdClientOptions {
  /** Open read-only even if the server allows writes. */
  readonly readOnly?: boolean
  /** Connections to use when the server advertises CAN_MULTI_CONN (default 1). */
  readonly connections?: number
  /** Requests in flight per connection (default 64). */
  readonly maxInFlightPerConnection?: number
  readonly reconnect?: Partial<NbdReconnectPolicy>
  /** Connect + handshake limit per attempt (default 30 s; 0: none). */
  readonly handshakeTimeoutMs?: number
  readonly clock?: Clock
}

/** Counters a caller (or a test) can read; they only grow. */
export interface NbdClientStats {
  /** Requests sent again on a new connection after theirs was lost. */
  resent: number
  /** Connections re-established after a loss. */
  reconnects: number
}

/** Zeroing requests carry no payload; pieces stay well below the u32 length field anyway. */
const MAX_ZERO_REQUEST_BYTES = 1 << 30

interface Slot {
  connection: NbdClientConnection | null
  reconnecting: boolean
}

export class NbdClientDevice extends BaseBlockDevice {
  readonly capabilities: DeviceCapabilities
  readonly uri: string
  readonly info: NbdExportInfo
  readonly stats: NbdClientStats = { resent: 0, reconnects: 0 }
  private readonly parsed: NbdUri
  private readonly tlsOptions: tls.ConnectionOptions | null
  private readonly options: Required<Omit<NbdClientOptions, 'reconnect' | 'readOnly'>> & { reconnect: NbdReconnectPolicy }
  private readonly slots: Slot[]
  private readonly waiting: NbdClientRequest[] = []
  private readonly lock = new RangeLock()
  private outstanding = 0
  private drained: (() => void) | null = null

  private constructor(
    parsed: NbdUri,
    tlsOptions: tls.ConnectionOptions | null,
    connections: NbdClientConnection[],
    options: NbdClientDevice['options'],
    readOnly: boolean,
  ) {
    const info = connections[0]!.info
    super(info.sizeBytes, parsed.text)
    this.parsed = parsed
    this.uri = parsed.text
    this.info = info
    this.tlsOptions = tlsOptions
    this.options = options
    const flags = info.transmissionFlags
    const writable = !readOnly && (flags & TransmissionFlag.READ_ONLY) === 0
    this.capabilities = {
      writable,
      flush: (flags & TransmissionFlag.SEND_FLUSH) !== 0,
      // Emulated with a FLUSH when the server has no FUA.
      fua: true,
      discard: writable && (flags & TransmissionFlag.SEND_WRITE_ZEROES) !== 0,
      resize: false,
    }
    this.slots = connections.map((connection) => ({ connection, reconnecting: false }))
    this.slots.forEach((slot) => this.attach(slot, slot.connection!))
  }

  /** Connects to `uri` (nbd://, nbds://, nbd+unix://, nbds+unix://) and negotiates. */
  static async open(uri: string, options: NbdClientOptions = {}): Promise<NbdClientDevice> {
    const parsed = parseNbdUri(uri)
    const tlsOptions = await loadClientTls(parsed)
    const resolved = {
      connections: Math.max(1, Math.floor(options.connections ?? 1)),
      maxInFlightPerConnection: Math.max(1, Math.floor(options.maxInFlightPerConnection ?? 64)),
      handshakeTimeoutMs: options.handshakeTimeoutMs ?? 30_000,
      clock: options.clock ?? systemClock,
      reconnect: { ...DEFAULT_RECONNECT, ...options.reconnect },
    }
    const connect = () => NbdClientConnection.connect(parsed, { tls: tlsOptions, timeoutMs: resolved.handshakeTimeoutMs })
    const first = await connect()
    const connections = [first]
    try {
      // Several connections only where the server promises they share one view of the data.
      if ((first.info.transmissionFlags & TransmissionFlag.CAN_MULTI_CONN) !== 0) {
        for (let i = 1; i < resolved.connections; i++) connections.push(await connect())
      }
    } catch (err) {
      await Promise.all(connections.map((c) => c.close()))
      throw err
    }
    return new NbdClientDevice(parsed, tlsOptions, connections, resolved, options.readOnly === true)
  }

  /** Connections currently carrying requests (for tests and status output). */
  get connectionCount(): number {
    return this.slots.filter((slot) => slot.connection?.alive === true).length
  }

  /** Requests sent on a live connection and not yet answered (for tests and status output). */
  get inFlightCount(): number {
    return this.slots.reduce((sum, slot) => sum + (slot.connection?.alive === true ? slot.connection.inFlightCount : 0), 0)
  }

  /** NBD TRIM: a hint that the range is unused; what it then reads back as is unspecified. */
  async trim(offset: number, length: number): Promise<void> {
    this.checkOpen()
    this.checkRange(offset, length)
    if (!this.capabilities.writable || (this.info.transmissionFlags & TransmissionFlag.SEND_TRIM) === 0) return
    const [start, end] = this.inner(offset, offset + length)
    for (let at = start; at < end; at += MAX_ZERO_REQUEST_BYTES) {
      await this.request(Command.TRIM, 0, at, Math.min(MAX_ZERO_REQUEST_BYTES, end - at))
    }
  }

  // ----------------------------------------------------------- device hooks

  protected async _readInto(target: Uint8Array, offset: number): Promise<void> {
    const end = offset + target.length
    const [start, alignedEnd] = this.outer(offset, end)
    if (start === offset && alignedEnd === end) return this.readAligned(target, offset)
    const bounce = new Uint8Array(alignedEnd - start)
    await this.readAligned(bounce, start)
    target.set(bounce.subarray(offset - start, end - start))
  }

  protected async _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    const end = offset + data.length
    if (this.info.minBlockBytes === 1) return this.writeAligned(data, offset, fua)
    const [start, alignedEnd] = this.outer(offset, end)
    const release = await this.lock.acquire(start, alignedEnd)
    try {
      if (start === offset && alignedEnd === end) return await this.writeAligned(data, offset, fua)
      const block = new Uint8Array(alignedEnd - start)
      await this.readAligned(block, start)
      block.set(data, offset - start)
      await this.writeAligned(block, start, fua)
    } finally {
      release()
    }
  }

  protected async _flush(): Promise<void> {
    if (this.capabilities.flush) await this.request(Command.FLUSH, 0, 0, 0)
  }

  protected override async _discard(offset: number, length: number): Promise<void> {
    const end = offset + length
    const [start, innerEnd] = this.inner(offset, end)
    if (start >= innerEnd) return this._write(new Uint8Array(length), offset, false)
    // Unaligned edges cannot be zeroed by the server: they are written as zeros.
    if (start > offset) await this._write(new Uint8Array(start - offset), offset, false)
    if (innerEnd < end) await this._write(new Uint8Array(end - innerEnd), innerEnd, false)
    const release = this.info.minBlockBytes === 1 ? () => {} : await this.lock.acquire(start, innerEnd)
    try {
      for (let at = start; at < innerEnd; at += MAX_ZERO_REQUEST_BYTES) {
        // No NO_HOLE: the server may deallocate, which is what a discard is for.
        await this.request(Command.WRITE_ZEROES, 0, at, Math.min(MAX_ZERO_REQUEST_BYTES, innerEnd - at))
      }
    } finally {
      release()
    }
  }

  protected override async _close(): Promise<void> {
    if (this.outstanding > 0) await new Promise<void>((resolve) => (this.drained = resolve))
    await Promise.all(this.slots.map((slot) => slot.connection?.close()))
  }

  // -------------------------------------------------------------- alignment

  /** [offset, end) widened to the server's minimum block (clipped to the export's end). */
  private outer(offset: number, end: number): [number, number] {
    const block = this.info.minBlockBytes
    if (block === 1) return [offset, end]
    return [offset - (offset % block), Math.min(this.sizeBytes, Math.ceil(end / block) * block)]
  }

  /** The aligned part inside [offset, end) (empty when there is none). */
  private inner(offset: number, end: number): [number, number] {
    const block = this.info.minBlockBytes
    if (block === 1) return [offset, end]
    const start = Math.ceil(offset / block) * block
    const innerEnd = end === this.sizeBytes ? end : end - (end % block)
    return [start, Math.max(start, innerEnd)]
  }

  private pieceBytes(): number {
    const { maxPayloadBytes, minBlockBytes } = this.info
    return maxPayloadBytes - (maxPayloadBytes % minBlockBytes)
  }

  private async readAligned(target: Uint8Array, offset: number): Promise<void> {
    const piece = this.pieceBytes()
    const reads: Promise<void>[] = []
    for (let at = 0; at < target.length; at += piece) {
      const view = target.subarray(at, Math.min(target.length, at + piece))
      reads.push(this.request(Command.READ, 0, offset + at, view.length, null, view))
    }
    await Promise.all(reads)
  }

  private async writeAligned(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    const nativeFua = fua && (this.info.transmissionFlags & TransmissionFlag.SEND_FUA) !== 0
    const piece = this.pieceBytes()
    const writes: Promise<void>[] = []
    for (let at = 0; at < data.length; at += piece) {
      const view = data.subarray(at, Math.min(data.length, at + piece))
      writes.push(this.request(Command.WRITE, nativeFua ? CommandFlag.FUA : 0, offset + at, view.length, view))
    }
    await Promise.all(writes)
    if (fua && !nativeFua) await this._flush()
  }

  // ------------------------------------------------------------ the queue

  private request(type: number, flags: number, offset: number, length: number, payload: Uint8Array | null = null, target: Uint8Array | null = null): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.outstanding++
      const settle = () => {
        this.outstanding--
        if (this.outstanding === 0 && this.drained !== null) {
          const drained = this.drained
          this.drained = null
          drained()
        }
      }
      const request: NbdClientRequest & { fail(err: SnapError): void } = {
        type,
        flags,
        offset,
        length,
        payload,
        target,
        complete: (error) => {
          settle()
          // A slot on that connection is free now.
          if (this.waiting.length > 0) this.pump()
          if (error === null) resolve()
          else reject(this.errorFor(request, error))
        },
        fail: (err) => {
          settle()
          reject(err)
        },
      }
      this.waiting.push(request)
      this.pump()
    })
  }

  private pump(): void {
    const perConnection = this.options.maxInFlightPerConnection
    while (this.waiting.length > 0) {
      let best: NbdClientConnection | null = null
      for (const slot of this.slots) {
        const connection = slot.connection
        if (connection === null || !connection.alive || connection.inFlightCount >= perConnection) continue
        if (best === null || connection.inFlightCount < best.inFlightCount) best = connection
      }
      if (best === null) break
      best.submit(this.waiting.shift()!)
    }
    // Every connection gave up earlier: a new request starts a new round of attempts.
    if (this.waiting.length > 0 && this.slots.every((slot) => slot.connection === null && !slot.reconnecting)) {
      void this.reconnect(this.slots[0]!, 'no connection to the server')
    }
  }

  private attach(slot: Slot, connection: NbdClientConnection): void {
    connection.setOnLost((requests, reason) => {
      if (slot.connection !== connection) return
      slot.connection = null
      // Resent first, in their original order: they were submitted before anything waiting.
      this.waiting.unshift(...requests)
      this.stats.resent += requests.length
      if (this.closed && requests.length === 0 && this.waiting.length === 0) return
      void this.reconnect(slot, reason)
    })
  }

  private async reconnect(slot: Slot, reason: string): Promise<void> {
    if (slot.reconnecting) return
    slot.reconnecting = true
    const policy = this.options.reconnect
    let lastError = reason
    for (let attempt = 1; attempt <= policy.attempts; attempt++) {
      const delayMs = Math.min(policy.maxDelayMs, policy.initialDelayMs * 2 ** (attempt - 1))
      await new Promise<void>((resolve) => this.options.clock.setTimer(delayMs, resolve, { unref: true }))
      try {
        const connection = await NbdClientConnection.connect(this.parsed, { tls: this.tlsOptions, timeoutMs: this.options.handshakeTimeoutMs })
        if (connection.info.sizeBytes !== this.sizeBytes) {
          await connection.close()
          lastError = `the export is now ${connection.info.sizeBytes} bytes, not ${this.sizeBytes}`
          break
        }
        slot.connection = connection
        slot.reconnecting = false
        this.stats.reconnects++
        this.attach(slot, connection)
        this.pump()
        return
      } catch (err) {
        lastError = err instanceof Error ? err.message : String(err)
      }
    }
    slot.reconnecting = false
    // Another connection may still carry the work (multi-conn); otherwise nothing can.
    if (this.slots.some((other) => other.connection?.alive === true || other.reconnecting)) return this.pump()
    const failure = ioError(`NBD server ${this.uri} unreachable after ${policy.attempts} attempts: ${lastError}`)
    for (const request of this.waiting.splice(0)) (request as NbdClientRequest & { fail(err: SnapError): void }).fail(failure)
  }

  private errorFor(request: NbdClientRequest, error: NbdReplyError): SnapError {
    const what = `${this.uri}: ${nameOfCommand(request.type)} ${request.offset}+${request.length} failed: ${nameOfErrno(error.errno)}${error.message ? ` (${error.message})` : ''}`
    switch (error.errno) {
      case NbdErrno.EPERM:
        return new SnapError('SNAP_READ_ONLY', what)
      case NbdErrno.ENOSPC:
        return new SnapError('SNAP_NO_SPACE', what)
      case NbdErrno.ENOTSUP:
        return notSupported(what)
      default:
        return ioError(what)
    }
  }
}
