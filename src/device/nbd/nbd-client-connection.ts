/**
 * One client connection to an NBD server: connect (TCP or Unix, optionally TLS), the fixed
 * newstyle handshake, then pipelined requests whose replies may come back in any order.
 *
 * Design notes:
 * - The handshake is a plain sequence of awaits over a byte queue; after GO the same queue feeds
 *   the reply parser, so reply bytes that arrive with the GO ACK are not lost.
 * - The connection never retries anything. When its socket dies it hands every request still in
 *   flight to `onLost`, once; the device decides whether to resend them (every NBD request is
 *   idempotent) on a new connection.
 * - ESHUTDOWN in a reply means the server is going away: the spec says disconnect, so it counts
 *   as losing the connection, not as the request failing.
 * - Requests are written in the order submitted; headers and payloads leave in one corked batch
 *   per tick.
 */
import net, { type Socket } from 'node:net'
import tls from 'node:tls'
import { SnapError, ioError } from '../../errors.js'
import { ByteQueue } from '../../protocol/nbd/byte-queue.js'
import {
  buildClientFlags,
  buildInfoRequestData,
  buildOptionRequest,
  buildRequestHeader,
  parseExportNameReply,
  parseGreeting,
  parseInfoReply,
  parseOptionReplyHeader,
  ReplyParser,
  type ReplyEvent,
} from '../../protocol/nbd/client.js'
import {
  ClientFlag,
  Command,
  EXPORT_NAME_PADDING_BYTES,
  GREETING_BYTES,
  HandshakeFlag,
  Info,
  MAX_PAYLOAD_BYTES,
  NbdErrno,
  OPTION_REPLY_HEADER_BYTES,
  Option,
  Rep,
  nameOfRep,
} from '../../protocol/nbd/constants.js'
import { UnixSocketAddress } from '../../util/unix-socket.js'
import type { NbdUri } from './nbd-uri.js'

/** What the server told us about the export at GO. */
export interface NbdExportInfo {
  readonly sizeBytes: number
  readonly transmissionFlags: number
  readonly structured: boolean
  /** Block size constraints (NBD_INFO_BLOCK_SIZE, or the spec's defaults). */
  readonly minBlockBytes: number
  readonly preferredBlockBytes: number
  readonly maxPayloadBytes: number
}

/** An NBD error reply, before the device turns it into a SnapError. */
export interface NbdReplyError {
  readonly errno: number
  readonly message: string
}

export interface NbdClientRequest {
  readonly type: number
  readonly flags: number
  readonly offset: number
  readonly length: number
  /** WRITE's payload. */
  readonly payload: Uint8Array | null
  /** READ's destination: byte 0 is `offset`. */
  readonly target: Uint8Array | null
  /** Called once per attempt that got a reply: null on success. */
  complete(error: NbdReplyError | null): void
}

/** Largest option reply we accept (names and messages are at most 4 KiB). */
const MAX_OPTION_REPLY_BYTES = 64 * 1024

const violation = (message: string) => new SnapError('NBD_PROTOCOL', message)

interface InFlight {
  readonly request: NbdClientRequest
  error: NbdReplyError | null
}

export interface ConnectOptions {
  /** Loaded TLS material, or null for plaintext (the URI decides which). */
  readonly tls: tls.ConnectionOptions | null
  /** Gives up on a connect + handshake that takes longer (0: no limit). */
  readonly timeoutMs: number
}

export class NbdClientConnection {
  readonly info: NbdExportInfo
  private readonly socket: Socket
  private readonly queue: ByteQueue
  private readonly parser: ReplyParser
  private readonly inFlight = new Map<number, InFlight>()
  private nextCookie = 1
  private lost = false
  private closing = false
  private corked = false
  private onLost: ((requests: NbdClientRequest[], reason: string) => void) | null = null
  private readonly closedPromise: Promise<void>

  private constructor(socket: Socket, queue: ByteQueue, info: NbdExportInfo) {
    this.socket = socket
    this.queue = queue
    this.info = info
    this.parser = new ReplyParser(queue, (cookie) => {
      const entry = this.inFlight.get(cookie)
      return entry !== undefined && entry.request.type === Command.READ ? entry.request.length : 0
    })
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()))
    socket.on('data', (chunk: Buffer) => {
      this.queue.push(chunk)
      this.pump()
    })
    socket.on('error', (err) => this.lose(`connection failed: ${err.message}`))
    socket.on('close', () => this.lose('server closed the connection'))
    socket.on('end', () => this.lose('server closed the connection'))
  }

  /** Connects and negotiates; rejects with a one-line reason (SNAP_IO, SNAP_NOT_FOUND or NBD_PROTOCOL). */
  static async connect(uri: NbdUri, options: ConnectOptions): Promise<NbdClientConnection> {
    const raw = await openSocket(uri)
    const queue = new ByteQueue()
    const reader = new HandshakeReader(raw, queue)
    let cancelTimer = () => {}
    if (options.timeoutMs > 0) {
      const timer = setTimeout(() => reader.fail(new Error(`handshake not finished within ${options.timeoutMs} ms`)), options.timeoutMs)
      timer.unref()
      cancelTimer = () => clearTimeout(timer)
    }
    try {
      const info = await negotiate(uri, reader, options.tls)
      reader.detach()
      return new NbdClientConnection(reader.socket, queue, info)
    } catch (err) {
      reader.socket.destroy()
      raw.destroy()
      throw err instanceof SnapError ? err : ioError(`${uri.text}: ${(err as Error).message}`, err)
    } finally {
      cancelTimer()
    }
  }

  get inFlightCount(): number {
    return this.inFlight.size
  }

  get alive(): boolean {
    return !this.lost && !this.closing
  }

  /** Called once, when the connection dies with requests (maybe none) unanswered. */
  setOnLost(handler: (requests: NbdClientRequest[], reason: string) => void): void {
    this.onLost = handler
  }

  submit(request: NbdClientRequest): void {
    const cookie = this.nextCookie
    this.nextCookie = this.nextCookie === 0xffff_ffff ? 1 : this.nextCookie + 1
    this.inFlight.set(cookie, { request, error: null })
    this.write(buildRequestHeader(request.flags, request.type, cookie, request.offset, request.length))
    if (request.payload !== null && request.payload.length > 0) this.write(request.payload)
  }

  /** Soft disconnect (NBD_CMD_DISC) once nothing is in flight; resolves when the socket closed. */
  async close(): Promise<void> {
    if (!this.lost && !this.closing) {
      this.closing = true
      this.write(buildRequestHeader(0, Command.DISC, 0, 0, 0))
      this.uncork()
      this.socket.end()
      const timer = setTimeout(() => this.socket.destroy(), 2000)
      timer.unref()
      await this.closedPromise
      clearTimeout(timer)
      return
    }
    this.socket.destroy()
    await this.closedPromise
  }

  /** Drops the connection at once; unanswered requests go to onLost. */
  destroy(reason: string): void {
    this.lose(reason)
  }

  private write(buf: Uint8Array): void {
    if (!this.corked) {
      this.corked = true
      this.socket.cork()
      process.nextTick(this.uncork)
    }
    this.socket.write(buf)
  }

  private readonly uncork = (): void => {
    if (!this.corked) return
    this.corked = false
    this.socket.uncork()
  }

  private pump(): void {
    if (this.lost) return
    try {
      for (;;) {
        const event = this.parser.next()
        if (event === null) return
        this.handle(event)
        if (this.lost) return
      }
    } catch (err) {
      this.lose((err as Error).message)
    }
  }

  private handle(event: ReplyEvent): void {
    const entry = this.inFlight.get(event.cookie)
    if (entry === undefined) throw violation(`reply for unknown cookie ${event.cookie}`)
    const request = entry.request
    if (event.kind === 'simple') {
      if (event.data !== null) request.target!.set(event.data, 0)
      this.finish(event.cookie, entry, event.error === 0 ? null : { errno: event.error, message: '' })
      return
    }
    const chunk = event.chunk
    if (chunk.type === 'data' || chunk.type === 'hole') {
      const length = chunk.type === 'data' ? chunk.data.length : chunk.length
      const at = chunk.offset - request.offset
      if (request.type !== Command.READ || at < 0 || at + length > request.length) {
        throw violation(`reply chunk ${chunk.offset}+${length} outside the request ${request.offset}+${request.length}`)
      }
      if (chunk.type === 'data') request.target!.set(chunk.data, at)
      else request.target!.fill(0, at, at + length)
    } else if (chunk.type === 'error') {
      // Several error chunks may come; the first one says enough.
      entry.error ??= { errno: chunk.error, message: chunk.message }
    }
    if (event.done) this.finish(event.cookie, entry, entry.error)
  }

  private finish(cookie: number, entry: InFlight, error: NbdReplyError | null): void {
    if (error !== null && error.errno === NbdErrno.ESHUTDOWN) {
      this.lose(`server is shutting down${error.message ? `: ${error.message}` : ''}`)
      return
    }
    this.inFlight.delete(cookie)
    entry.request.complete(error)
  }

  private lose(reason: string): void {
    if (this.lost) return
    this.lost = true
    this.socket.destroy()
    const requests = [...this.inFlight.values()].map((entry) => entry.request)
    this.inFlight.clear()
    this.queue.clear()
    if (!this.closing || requests.length > 0) this.onLost?.(requests, reason)
  }
}

async function openSocket(uri: NbdUri): Promise<Socket> {
  const transport = uri.transport
  let address: UnixSocketAddress | null = null
  try {
    let socket: Socket
    if (transport.kind === 'tcp') {
      socket = net.createConnection({ host: transport.host, port: transport.port, noDelay: true })
    } else {
      address = await UnixSocketAddress.of(transport.path)
      socket = net.createConnection({ path: address.bindPath })
    }
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve)
      socket.once('error', reject)
    })
    socket.setNoDelay(true)
    return socket
  } catch (err) {
    throw ioError(`cannot connect to ${uri.text}: ${(err as Error).message}`, err)
  } finally {
    await address?.release()
  }
}

/** Reads exact byte counts from a socket during the handshake. */
class HandshakeReader {
  socket: Socket
  private readonly queue: ByteQueue
  private waiter: (() => void) | null = null
  private failure: Error | null = null

  constructor(socket: Socket, queue: ByteQueue) {
    this.socket = socket
    this.queue = queue
    this.listen(socket)
  }

  listen(socket: Socket): void {
    this.socket = socket
    socket.on('data', this.onData)
    socket.on('error', this.onError)
    socket.on('close', this.onClose)
  }

  detach(): void {
    this.socket.off('data', this.onData)
    this.socket.off('error', this.onError)
    this.socket.off('close', this.onClose)
  }

  fail(err: Error): void {
    this.failure ??= err
    this.wake()
  }

  send(buf: Uint8Array): void {
    this.socket.write(buf)
  }

  async take(n: number): Promise<Buffer> {
    for (;;) {
      const got = this.queue.take(n, Buffer.alloc)
      if (got !== null) return Buffer.from(got)
      if (this.failure) throw this.failure
      await new Promise<void>((resolve) => {
        this.waiter = resolve
      })
    }
  }

  get buffered(): number {
    return this.queue.length
  }

  private wake(): void {
    const waiter = this.waiter
    this.waiter = null
    waiter?.()
  }

  private readonly onData = (chunk: Buffer): void => {
    this.queue.push(chunk)
    this.wake()
  }

  private readonly onError = (err: Error): void => this.fail(err)
  private readonly onClose = (): void => this.fail(new Error('server closed the connection during the handshake'))
}

interface OptionReply {
  readonly type: number
  readonly data: Buffer
}

async function optionReply(reader: HandshakeReader, option: number): Promise<OptionReply> {
  const header = parseOptionReplyHeader(await reader.take(OPTION_REPLY_HEADER_BYTES))
  if (header.option !== option) throw violation(`reply to option ${header.option} while waiting for ${option}`)
  if (header.length > MAX_OPTION_REPLY_BYTES) throw violation(`option reply of ${header.length} bytes`)
  return { type: header.type, data: await reader.take(header.length) }
}

function optionFailure(uri: NbdUri, what: string, reply: OptionReply): SnapError {
  const said = reply.data.length > 0 ? `: ${reply.data.toString('utf8')}` : ''
  if (reply.type === Rep.ERR_UNKNOWN) return new SnapError('SNAP_NOT_FOUND', `${uri.text}: the server has no export '${uri.exportName}'${said}`)
  if (reply.type === Rep.ERR_TLS_REQD) return ioError(`${uri.text}: the server requires TLS (use nbds://)${said}`)
  return ioError(`${uri.text}: ${what} refused (${nameOfRep(reply.type)})${said}`)
}

async function negotiate(uri: NbdUri, reader: HandshakeReader, tlsOptions: tls.ConnectionOptions | null): Promise<NbdExportInfo> {
  const serverFlags = parseGreeting(await reader.take(GREETING_BYTES))
  const noZeroes = (serverFlags & HandshakeFlag.NO_ZEROES) !== 0
  reader.send(buildClientFlags(ClientFlag.FIXED_NEWSTYLE | (noZeroes ? ClientFlag.NO_ZEROES : 0)))

  if (tlsOptions !== null) {
    reader.send(buildOptionRequest(Option.STARTTLS))
    const reply = await optionReply(reader, Option.STARTTLS)
    if (reply.type !== Rep.ACK) throw optionFailure(uri, 'STARTTLS', reply)
    if (reader.buffered > 0) throw violation('data after the STARTTLS reply')
    const plain = reader.socket
    reader.detach()
    const secure = tls.connect({ ...tlsOptions, socket: plain })
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve)
      secure.once('error', (err) => reject(ioError(`${uri.text}: TLS handshake failed: ${err.message}`, err)))
    })
    reader.listen(secure)
  }

  reader.send(buildOptionRequest(Option.STRUCTURED_REPLY))
  const structuredReply = await optionReply(reader, Option.STRUCTURED_REPLY)
  if (structuredReply.type !== Rep.ACK && (structuredReply.type & 0x8000_0000) === 0) {
    throw violation(`unexpected reply ${structuredReply.type} to STRUCTURED_REPLY`)
  }
  if (structuredReply.type === Rep.ERR_TLS_REQD) throw optionFailure(uri, 'STRUCTURED_REPLY', structuredReply)
  const structured = structuredReply.type === Rep.ACK

  reader.send(buildOptionRequest(Option.GO, buildInfoRequestData(uri.exportName, [Info.BLOCK_SIZE])))
  let exportInfo: { sizeBytes: number; transmissionFlags: number } | null = null
  let block = { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD_BYTES }
  for (;;) {
    const reply = await optionReply(reader, Option.GO)
    if (reply.type === Rep.INFO) {
      const info = parseInfoReply(reply.data)
      if (info.info === 'export') exportInfo = info
      else if (info.info === 'block-size') block = info
      continue
    }
    if (reply.type === Rep.ACK) break
    if (reply.type === Rep.ERR_UNSUP) {
      // An old server without GO: EXPORT_NAME cannot report errors, it just hangs up.
      reader.send(buildOptionRequest(Option.EXPORT_NAME, Buffer.from(uri.exportName, 'utf8')))
      exportInfo = parseExportNameReply(await reader.take(10))
      if (!noZeroes) await reader.take(EXPORT_NAME_PADDING_BYTES)
      break
    }
    if ((reply.type & 0x8000_0000) !== 0) throw optionFailure(uri, 'GO', reply)
    // Other reply types to GO carry nothing we need.
  }
  if (exportInfo === null) throw violation('GO succeeded without NBD_INFO_EXPORT')
  const isPowerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0
  if (!isPowerOfTwo(block.minimum) || block.minimum > 65536 || block.maximum < block.minimum) {
    throw violation(`bad block size constraints ${block.minimum}/${block.preferred}/${block.maximum}`)
  }
  return {
    sizeBytes: exportInfo.sizeBytes,
    transmissionFlags: exportInfo.transmissionFlags,
    structured,
    minBlockBytes: block.minimum,
    preferredBlockBytes: block.preferred,
    // 0xffffffff means "no limit"; we still never send more than the spec's default in one go.
    maxPayloadBytes: Math.min(block.maximum, MAX_PAYLOAD_BYTES),
  }
}
