/**
 * One NBD client: the fixed newstyle handshake, then the transmission phase.
 *
 * Design notes:
 * - Bytes go into one ByteQueue shared by the option parser and the request parser, so bytes a
 *   client pipelines right after GO are not lost in the hand-over.
 * - The handshake is synchronous per option (the export provider is synchronous), so options
 *   are answered strictly in order, as the protocol requires.
 * - Transmission is pipelined: requests are parsed as they arrive and dispatched at once; each
 *   runs concurrently and replies when it completes, so replies go out of order. Replies written
 *   in the same tick are batched with cork/uncork.
 * - Back-pressure: parsing stops (and the socket is paused) while too many requests or too many
 *   payload bytes are in flight, or while the socket's write buffer is full. Memory per client is
 *   therefore bounded by the limits plus one request. Across clients, the server's PendingBytes
 *   bounds the total the same way: a WRITE's payload counts from the moment its header is read
 *   (reading on is then admitted), so no client reads a payload the server has no room for.
 * - Validation is one step (`validate`), the wire-side twin of BaseBlockDevice's checked
 *   boundary; errors become wire errnos only through errno.ts.
 * - Nothing thrown by a client's bytes or by a device escapes: protocol violations close this
 *   socket with a one-line log, device errors become error replies. Other connections are never
 *   touched.
 */
import type { Socket } from 'node:net'
import type { TLSSocket } from 'node:tls'
import { SnapError, isSnapError } from '../errors.js'
import type { Clock } from '../util/clock.js'
import { describeError, nbdErrnoFor } from './errno.js'
import { isRefused, type ExportProvider, type NbdExport } from './export.js'
import type { NbdLogger } from './logger.js'
import type { PayloadPool } from './protocol/payload-pool.js'
import type { PendingBytes } from './pending-bytes.js'
import { opOfCommand, type NbdRequestObserver } from './request-observer.js'
import { ByteQueue } from './protocol/byte-queue.js'
import {
  BaseAllocation,
  CLIENT_FLAGS_BYTES,
  ClientFlag,
  Command,
  CommandFlag,
  Info,
  MAX_BLOCK_STATUS_EXTENTS,
  MAX_HANDSHAKE_OPTIONS,
  MAX_PAYLOAD_BYTES,
  MIN_BLOCK_BYTES,
  NbdErrno,
  Option,
  PREFERRED_BLOCK_BYTES,
  ReplyFlag,
  Rep,
  TransmissionFlag,
  nameOfCommand,
  nameOfErrno,
  nameOfOption,
} from './protocol/constants.js'
import {
  OptionParser,
  buildExportNameReply,
  buildGreeting,
  buildInfoBlockSize,
  buildInfoDescription,
  buildInfoExport,
  buildInfoName,
  buildOptionError,
  buildOptionReply,
  buildRepMetaContext,
  buildRepServer,
  decodeString,
  parseClientFlags,
  parseInfoRequest,
  parseMetaContextRequest,
} from './protocol/handshake.js'
import {
  buildBlockStatusChunk,
  buildErrorChunk,
  buildNoneChunk,
  buildOffsetDataHeader,
  buildSimpleReply,
  type Extent,
} from './protocol/reply.js'
import { RequestParser, offsetText, type RequestHeader } from './protocol/request.js'
import { describePeer, type TlsContext, type TlsPeer } from './tls.js'

export interface ConnectionLimits {
  /** Requests dispatched and not yet answered. */
  readonly maxInFlightRequests: number
  /** Payload and read bytes held by in-flight requests (one request may always exceed it). */
  readonly maxInFlightBytes: number
}

export const DEFAULT_CONNECTION_LIMITS: ConnectionLimits = {
  maxInFlightRequests: 128,
  maxInFlightBytes: 64 * 1024 * 1024,
}

export interface ConnectionOptions {
  readonly id: number
  readonly exports: ExportProvider
  readonly tls: TlsContext | null
  readonly logger: NbdLogger
  readonly limits: ConnectionLimits
  /** Told about every export a client entered transmission with, so close() can flush it. */
  readonly onExportServed: (exp: NbdExport) => void
  /** A client still negotiating after this long is dropped (0: no limit). */
  readonly handshakeTimeoutMs: number
  /** The server-wide count of bytes held by unanswered requests, and its cap. */
  readonly pending: PendingBytes
  /** Buffers for large WRITE payloads, shared by the server's connections. */
  readonly payloads: PayloadPool
  readonly clock: Clock
  /** Told about every answered request (null: nobody listens, and nothing is measured). */
  readonly requestObserver: NbdRequestObserver | null
}

type Phase = 'client-flags' | 'options' | 'starttls' | 'transmission' | 'closing' | 'closed'

/** How long a shutting-down server keeps answering ERR_SHUTDOWN to a client still in the handshake. */
const SHUTDOWN_HANDSHAKE_GRACE_MS = 1000

/** How long an ended socket may wait for the peer to close its side before it is destroyed. */
const CLOSE_LINGER_MS = 2000

/** Reply bytes queued on the socket beyond which we stop taking new requests. */
const MAX_UNSENT_BYTES = 4 * 1024 * 1024

/** Write zeros in pieces no larger than this, so a huge WRITE_ZEROES never allocates much. */
const ZERO_PIECE_BYTES = 1024 * 1024

/** A client broke a MUST of the protocol: the only answer is to drop its connection. */
const violation = (message: string) => new SnapError('NBD_PROTOCOL', message)

/** Longest client-chosen export name quoted in logs and errors. */
const SHOWN_NAME_CHARS = 64

/** A client-chosen name as logs show it: a client may send 64 KiB names, once per connection. */
export function shownName(name: string): string {
  const cut = name.length <= SHOWN_NAME_CHARS ? name : `${name.slice(0, SHOWN_NAME_CHARS)}…`
  // The bytes are the client's: a newline or a terminal escape must not break or forge a log line.
  return cut.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
}

export class NbdConnection {
  readonly id: number
  private socket: Socket
  /** The TCP/Unix socket under any TLS layer; destroying it always ends the connection. */
  private readonly rawSocket: Socket
  private readonly options: ConnectionOptions
  private readonly log: NbdLogger
  private readonly label: string
  private readonly queue = new ByteQueue()
  private readonly optionParser: OptionParser
  private requestParser: RequestParser | null = null
  private phase: Phase = 'client-flags'
  private noZeroes = false
  /** Options received so far in the handshake (MAX_HANDSHAKE_OPTIONS). */
  private optionCount = 0
  /** Who the client authenticated as, once TLS is up (null: plaintext so far). */
  private tlsPeer: TlsPeer | null = null
  private structured = false
  /** Meta contexts chosen by the last SET_META_CONTEXT, by id, and the export they were for. */
  private contexts: string[] = []
  private contextExport: string | null = null
  private exp: NbdExport | null = null
  private transmissionFlags = 0
  private shuttingDown = false
  /** Client sent DISC, or half-closed and every complete request was dispatched: parse no more. */
  private inputDone = false
  /** The client half-closed its side (EOF). */
  private peerEnded = false
  private graceTimer: NodeJS.Timeout | undefined
  private cancelHandshakeTimer: (() => void) | undefined
  private inFlight = 0
  private inFlightBytes = 0
  /** Held in `pending` for the WRITE whose payload is arriving (0: none). */
  private assemblingBytes = 0
  private waitingForRoom = false
  private writeBlocked = false
  private corked = false
  private readonly closedPromise: Promise<void>
  private resolveClosed!: () => void

  constructor(socket: Socket, options: ConnectionOptions) {
    this.id = options.id
    this.socket = socket
    this.rawSocket = socket
    this.options = options
    this.log = options.logger
    this.label = `nbd conn#${options.id} ${socket.remoteAddress ?? 'unix'}${socket.remotePort ? `:${socket.remotePort}` : ''}`
    this.optionParser = new OptionParser(this.queue)
    this.closedPromise = new Promise((resolve) => {
      this.resolveClosed = resolve
    })
  }

  /** The export this client is in transmission with (null in the handshake or once closing). */
  get servedExport(): NbdExport | null {
    return this.phase === 'transmission' ? this.exp : null
  }

  /** Resolves once the socket is fully closed. */
  get closed(): Promise<void> {
    return this.closedPromise
  }

  start(): void {
    this.attach(this.socket)
    this.log.debug(`${this.label}: connected`)
    const limit = this.options.handshakeTimeoutMs
    if (limit > 0) {
      // A client that connects and never finishes negotiating would hold its slot forever.
      this.cancelHandshakeTimer = this.options.clock.setTimer(
        limit,
        () => {
          this.log.warn(`${this.label}: handshake not finished within ${limit} ms; disconnecting`)
          this.hardClose()
        },
        { unref: true },
      )
    }
    this.send(buildGreeting())
  }

  /**
   * Server shutdown. In transmission, new requests get ESHUTDOWN and the socket ends once
   * in-flight ones are answered. In the handshake, options still arriving get ERR_SHUTDOWN (the
   * client must then soft-disconnect), but an idle client is only waited for briefly.
   */
  shutdown(): void {
    if (this.shuttingDown) return
    this.shuttingDown = true
    if (this.phase === 'transmission') {
      this.maybeFinish()
    } else if (this.phase === 'options' || this.phase === 'starttls') {
      this.graceTimer = setTimeout(() => this.endSocket(), SHUTDOWN_HANDSHAKE_GRACE_MS)
      this.graceTimer.unref()
    } else {
      this.endSocket()
    }
  }

  /** Hard stop: used when a graceful shutdown takes too long. */
  destroy(): void {
    this.socket.destroy()
    this.rawSocket.destroy()
  }

  private attach(socket: Socket): void {
    socket.setNoDelay(true)
    socket.on('data', this.onData)
    socket.on('end', this.onEnd)
    socket.on('error', this.onError)
    socket.on('close', this.onClose)
    socket.on('drain', this.onDrain)
  }

  private readonly onData = (chunk: Buffer): void => {
    if (this.phase === 'closing' || this.phase === 'closed') return
    this.queue.push(chunk)
    this.pump()
  }

  private readonly onEnd = (): void => {
    // Client half-closed. Requests already buffered still run; then close our side.
    this.peerEnded = true
    if (this.phase === 'transmission') this.pump()
    else this.endSocket()
  }

  private readonly onError = (err: Error): void => {
    // Resets and TLS failures are routine client behaviour: one line, and the socket closes.
    this.log.debug(`${this.label}: socket error: ${describeError(err)}`)
  }

  private readonly onClose = (): void => {
    this.phase = 'closed'
    this.dropAssembling()
    if (this.waitingForRoom) this.options.pending.cancel(this.onRoom)
    clearTimeout(this.graceTimer)
    this.cancelHandshakeTimer?.()
    this.queue.clear()
    this.log.debug(`${this.label}: closed`)
    this.resolveClosed()
  }

  private readonly onRoom = (): void => {
    this.waitingForRoom = false
    if (this.phase === 'transmission') this.pump()
  }

  private readonly onDrain = (): void => {
    this.writeBlocked = false
    if (this.phase === 'options') this.socket.resume()
    this.pump()
  }

  /** Runs the parsers over buffered bytes; the only place client bytes are interpreted. */
  private pump(): void {
    try {
      if (this.phase === 'client-flags' || this.phase === 'options') this.pumpHandshake()
      if (this.phase === 'transmission') this.pumpTransmission()
    } catch (err) {
      if (isSnapError(err, 'NBD_PROTOCOL')) {
        this.log.warn(`${this.label}: ${err.message}; disconnecting`)
      } else {
        this.log.error(`${this.label}: internal error: ${describeError(err)}; disconnecting`)
      }
      this.hardClose()
    }
  }

  // ---------------------------------------------------------------- handshake

  private pumpHandshake(): void {
    if (this.phase === 'client-flags') {
      const raw = this.queue.take(CLIENT_FLAGS_BYTES)
      if (raw === null) return
      const flags = parseClientFlags(raw)
      // Unknown bits, or bits we did not offer: the spec says drop the connection.
      if ((flags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)) !== 0) {
        throw violation(`unknown client flags 0x${flags.toString(16)}`)
      }
      this.noZeroes = (flags & ClientFlag.NO_ZEROES) !== 0
      this.phase = 'options'
    }
    // A client that sends options without reading the replies must not make us buffer them all.
    while (this.phase === 'options' && !this.writeBlocked) {
      const event = this.optionParser.next()
      if (event === null) return
      if (event.kind === 'bad-magic') throw violation('bad option magic')
      if (++this.optionCount > MAX_HANDSHAKE_OPTIONS) {
        // Not a hard close: the answers already given still reach the client.
        this.log.warn(`${this.label}: more than ${MAX_HANDSHAKE_OPTIONS} options without choosing an export; disconnecting`)
        this.endSocket()
        return
      }
      if (event.kind === 'too-big') {
        if (event.code === Option.EXPORT_NAME) throw violation(`EXPORT_NAME of ${event.length} bytes`)
        this.optionError(event.code, Rep.ERR_TOO_BIG, `option data of ${event.length} bytes is too large`)
        continue
      }
      this.handleOption(event.code, event.data)
    }
    if (this.phase === 'options' && this.writeBlocked) this.socket.pause()
  }

  private handleOption(code: number, data: Buffer): void {
    this.log.debug(`${this.label}: ${nameOfOption(code)} (${data.length} bytes)`)
    if (code === Option.ABORT) {
      this.send(buildOptionReply(code, Rep.ACK))
      this.endSocket()
      return
    }
    if (this.shuttingDown) {
      if (code === Option.EXPORT_NAME) throw violation('EXPORT_NAME during shutdown')
      this.optionError(code, Rep.ERR_SHUTDOWN, 'server is shutting down')
      return
    }
    const tlsRequired = this.options.tls?.mode === 'require' && this.tlsPeer === null
    if (tlsRequired && code !== Option.STARTTLS) {
      if (code === Option.EXPORT_NAME) throw violation('EXPORT_NAME without TLS, which this server requires')
      this.optionError(code, Rep.ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first')
      return
    }
    switch (code) {
      case Option.EXPORT_NAME:
        return this.optExportName(data)
      case Option.LIST:
        return this.optList(data)
      case Option.STARTTLS:
        return this.optStartTls(data)
      case Option.INFO:
      case Option.GO:
        return this.optInfoGo(code, data)
      case Option.STRUCTURED_REPLY:
        return this.optStructuredReply(data)
      case Option.LIST_META_CONTEXT:
      case Option.SET_META_CONTEXT:
        return this.optMetaContext(code, data)
      default:
        // PEEK_EXPORT (withdrawn), EXTENDED_HEADERS (not implemented) and anything unknown.
        this.optionError(code, Rep.ERR_UNSUP, `${nameOfOption(code)} is not supported`)
    }
  }

  private optionError(code: number, type: number, message: string): void {
    this.log.debug(`${this.label}: ${nameOfOption(code)} refused: ${message}`)
    this.send(buildOptionError(code, type, message))
  }

  /** Resolves a client-supplied name; '' is the provider's own '' export or else its first one. */
  private resolveExport(name: string): NbdExport | { refused: string } | undefined {
    const provider = this.options.exports
    const found = provider.get(name)
    if (found === undefined && name === '') return provider.list()[0]
    return found
  }

  private computeFlags(exp: NbdExport): number {
    const caps = exp.device.capabilities
    let flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_CACHE
    // Every connection to an export shares one device object, so a flush on one connection
    // covers writes acknowledged on all of them: exactly the CAN_MULTI_CONN promise.
    flags |= TransmissionFlag.CAN_MULTI_CONN
    if (this.structured) flags |= TransmissionFlag.SEND_DF
    if (exp.readOnly || !caps.writable) {
      flags |= TransmissionFlag.READ_ONLY
    } else {
      flags |= TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
      if (caps.discard) flags |= TransmissionFlag.SEND_TRIM
    }
    return flags
  }

  private optExportName(data: Buffer): void {
    const name = decodeString(data, 0, data.length)
    // The same rule as GO's names; EXPORT_NAME cannot carry an error, so a bad name ends it.
    if (typeof name !== 'string') throw violation(`EXPORT_NAME '${shownName(data.toString('utf8'))}' refused: ${name.error}`)
    const exp = this.resolveExport(name)
    // EXPORT_NAME cannot carry an error: closing is the only answer.
    if (exp === undefined) throw violation(`EXPORT_NAME for unknown export '${shownName(name)}'`)
    if (isRefused(exp)) throw violation(`EXPORT_NAME for refused export '${shownName(name)}': ${exp.refused}`)
    const flags = this.computeFlags(exp)
    this.send(buildExportNameReply(exp.device.sizeBytes, flags, this.noZeroes))
    this.enterTransmission(exp, flags)
  }

  private optList(data: Buffer): void {
    if (data.length !== 0) return this.optionError(Option.LIST, Rep.ERR_INVALID, 'LIST takes no data')
    for (const exp of this.options.exports.list()) {
      this.send(buildRepServer(Option.LIST, exp.name, exp.description ?? ''))
    }
    this.send(buildOptionReply(Option.LIST, Rep.ACK))
  }

  private optStartTls(data: Buffer): void {
    const tlsContext = this.options.tls
    if (tlsContext === null) return this.optionError(Option.STARTTLS, Rep.ERR_UNSUP, 'TLS is not enabled on this server')
    if (data.length !== 0) return this.optionError(Option.STARTTLS, Rep.ERR_INVALID, 'STARTTLS takes no data')
    if (this.tlsPeer !== null) return this.optionError(Option.STARTTLS, Rep.ERR_INVALID, 'TLS is already active')
    // The client must wait for our ACK before starting TLS, so bytes already here are garbage
    // (and could not be handed to the TLS layer, which reads the handle directly).
    if (this.queue.length > 0) throw violation('data after STARTTLS before the TLS handshake')
    this.send(buildOptionReply(Option.STARTTLS, Rep.ACK))
    this.uncork()
    this.phase = 'starttls'
    const plain = this.socket
    // From here the TLS socket reads and writes; the plain one still reports errors and close.
    plain.off('data', this.onData)
    plain.off('end', this.onEnd)
    plain.off('drain', this.onDrain)
    try {
      tlsContext.handshake(plain, {
        secure: (secure, peer) => this.tlsEstablished(secure, peer),
        refused: (reason) => {
          // A handshake cut short by our own shutdown or handshake limit is not the client's doing.
          if (this.phase !== 'closing') this.log.warn(`${this.label}: TLS client refused: ${reason}`)
          this.hardClose()
        },
      })
    } catch (err) {
      this.log.error(`${this.label}: TLS setup failed: ${describeError(err)}`)
      this.hardClose()
    }
  }

  private tlsEstablished(secure: TLSSocket, peer: TlsPeer): void {
    if (this.phase !== 'starttls') {
      // Shut down or dropped while the handshake ran.
      secure.destroy()
      return
    }
    this.log.debug(`${this.label}: TLS ${secure.getProtocol() ?? ''} established with ${describePeer(peer)}`)
    this.socket = secure
    // STARTTLS forgets everything negotiated before it.
    this.tlsPeer = peer
    this.structured = false
    this.contexts = []
    this.contextExport = null
    this.phase = 'options'
    secure.on('data', this.onData)
    secure.on('end', this.onEnd)
    secure.on('error', (err: Error) => {
      this.log.warn(`${this.label}: TLS error: ${describeError(err)}`)
      this.rawSocket.destroy()
    })
    secure.on('drain', this.onDrain)
    this.pump()
  }

  private optStructuredReply(data: Buffer): void {
    if (data.length !== 0) return this.optionError(Option.STRUCTURED_REPLY, Rep.ERR_INVALID, 'STRUCTURED_REPLY takes no data')
    if (this.structured) return this.optionError(Option.STRUCTURED_REPLY, Rep.ERR_INVALID, 'structured replies already negotiated')
    this.structured = true
    this.send(buildOptionReply(Option.STRUCTURED_REPLY, Rep.ACK))
  }

  private optInfoGo(code: number, data: Buffer): void {
    const request = parseInfoRequest(data)
    if ('error' in request) return this.optionError(code, Rep.ERR_INVALID, request.error)
    const exp = this.resolveExport(request.name)
    if (exp === undefined) return this.optionError(code, Rep.ERR_UNKNOWN, `no export named '${shownName(request.name)}'`)
    if (isRefused(exp)) return this.optionError(code, Rep.ERR_POLICY, exp.refused)
    // INFO and GO compute the same answer from the same state, so they always agree.
    const flags = this.computeFlags(exp)
    this.send(buildInfoExport(code, exp.device.sizeBytes, flags))
    if (request.infos.includes(Info.NAME)) this.send(buildInfoName(code, exp.name))
    if (request.infos.includes(Info.DESCRIPTION) && exp.description) this.send(buildInfoDescription(code, exp.description))
    // Sent even unasked: the constraints are the defaults anyway, and clients ignore extras.
    this.send(buildInfoBlockSize(code, MIN_BLOCK_BYTES, PREFERRED_BLOCK_BYTES, MAX_PAYLOAD_BYTES))
    this.send(buildOptionReply(code, Rep.ACK))
    if (code === Option.GO) this.enterTransmission(exp, flags)
  }

  private contextsOf(exp: NbdExport): string[] {
    const names = [BaseAllocation.CONTEXT as string]
    for (const name of exp.metaContexts ?? []) if (!names.includes(name)) names.push(name)
    return names
  }

  private optMetaContext(code: number, data: Buffer): void {
    const isSet = code === Option.SET_META_CONTEXT
    // A SET replaces the previous selection even when it fails.
    if (isSet) {
      this.contexts = []
      this.contextExport = null
    }
    if (isSet && !this.structured) return this.optionError(code, Rep.ERR_INVALID, 'negotiate structured replies first')
    const request = parseMetaContextRequest(data)
    if ('error' in request) return this.optionError(code, Rep.ERR_INVALID, request.error)
    const exp = this.resolveExport(request.name)
    if (exp === undefined) return this.optionError(code, Rep.ERR_UNKNOWN, `no export named '${shownName(request.name)}'`)
    if (isRefused(exp)) return this.optionError(code, Rep.ERR_POLICY, exp.refused)
    const available = this.contextsOf(exp)
    const chosen: string[] = []
    const add = (name: string) => {
      if (!chosen.includes(name)) chosen.push(name)
    }
    if (!isSet && request.queries.length === 0) available.forEach(add)
    for (const query of request.queries) {
      if (available.includes(query)) add(query)
      // 'namespace:' lists the whole namespace; SET ignores wildcards (spec: 'base:' is ignored).
      else if (!isSet && query.endsWith(':')) for (const name of available) if (name.startsWith(query)) add(name)
    }
    if (isSet) {
      this.contexts = chosen
      this.contextExport = exp.name
    }
    chosen.forEach((name, index) => this.send(buildRepMetaContext(code, isSet ? index + 1 : 0, name)))
    this.send(buildOptionReply(code, Rep.ACK))
  }

  private enterTransmission(exp: NbdExport, flags: number): void {
    this.exp = exp
    this.transmissionFlags = flags
    // Contexts only count if the last SET named this export.
    if (this.contextExport !== exp.name) this.contexts = []
    this.requestParser = new RequestParser(MAX_PAYLOAD_BYTES, this.queue, (n) => this.options.payloads.acquire(n))
    this.phase = 'transmission'
    this.cancelHandshakeTimer?.()
    this.options.onExportServed(exp)
    this.log.info(
      `${this.label}: serving '${exp.name}' (${exp.device.sizeBytes} bytes, flags 0x${flags.toString(16)}` +
        `${this.structured ? ', structured' : ''}${this.tlsPeer ? `, tls, ${describePeer(this.tlsPeer)}` : ''})`,
    )
  }

  // ------------------------------------------------------------- transmission

  private canDispatch(): boolean {
    const limits = this.options.limits
    return (
      !this.inputDone &&
      !this.writeBlocked &&
      this.inFlight < limits.maxInFlightRequests &&
      (this.inFlight === 0 || this.inFlightBytes < limits.maxInFlightBytes) &&
      (this.assemblingBytes > 0 || this.options.pending.hasRoom)
    )
  }

  private pumpTransmission(): void {
    const parser = this.requestParser!
    while (this.canDispatch()) {
      const event = parser.next()
      if (event === null) {
        // A WRITE's payload is arriving: it is held from now on, and reading it was admitted.
        const awaited = parser.awaitedPayloadBytes
        if (awaited > 0 && this.assemblingBytes === 0) {
          this.assemblingBytes = awaited
          this.options.pending.hold(awaited)
        }
        break
      }
      if (event.kind === 'bad-magic') {
        throw violation(`bad request magic 0x${event.magic.toString(16).padStart(8, '0')}`)
      }
      const { header } = event
      if (header.type === Command.DISC) {
        this.log.debug(`${this.label}: NBD_CMD_DISC`)
        this.inputDone = true
        this.maybeFinish()
        return
      }
      if (event.kind === 'dropped') {
        // The payload was drained unread; answering keeps the stream in sync.
        this.replyError(header, NbdErrno.EINVAL, `${nameOfCommand(header.type)} of ${header.length} bytes exceeds the maximum payload ${MAX_PAYLOAD_BYTES}`)
        if (this.options.requestObserver !== null) this.observe(this.options.requestObserver, header, this.options.clock.now())
        continue
      }
      const bytes = header.type === Command.READ ? header.length : (event.payload?.length ?? 0)
      this.inFlight++
      this.inFlightBytes += bytes
      // A payload held while it arrived stays held by its request; anything else is held now.
      if (this.assemblingBytes > 0) this.assemblingBytes = 0
      else this.options.pending.hold(bytes)
      void this.runRequest(header, event.payload, bytes)
    }
    if (this.inputDone) return
    if (this.peerEnded && this.canDispatch()) {
      // EOF, and every complete request has been dispatched: what is left is a partial frame.
      this.inputDone = true
      this.maybeFinish()
      return
    }
    if (this.canDispatch()) {
      this.socket.resume()
      return
    }
    this.socket.pause()
    if (!this.options.pending.hasRoom && this.assemblingBytes === 0 && !this.waitingForRoom) {
      this.waitingForRoom = true
      this.options.pending.whenRoom(this.onRoom)
    }
  }

  /** Lets go of the bytes held for a payload that will never be read (the connection ends). */
  private dropAssembling(): void {
    if (this.assemblingBytes === 0) return
    this.options.pending.release(this.assemblingBytes)
    this.assemblingBytes = 0
  }

  private async runRequest(header: RequestHeader, payload: Buffer | null, bytes: number): Promise<void> {
    const observer = this.options.requestObserver
    const startedMs = observer === null ? 0 : this.options.clock.now()
    try {
      await this.handleRequest(header, payload)
      // The device is done with it (BlockDevice contract), whatever the outcome was. A closed
      // connection's buffers are not pooled: the server may have trimmed the pool for idleness.
      if (payload && this.phase !== 'closed') this.options.payloads.release(payload)
    } catch (err) {
      // handleRequest answers every device error itself; reaching here is a bug in this file.
      this.log.error(`${this.label}: internal error in ${nameOfCommand(header.type)}: ${describeError(err)}`)
      this.hardClose()
    } finally {
      if (observer !== null) this.observe(observer, header, startedMs)
      this.inFlight--
      this.inFlightBytes -= bytes
      this.options.pending.release(bytes)
      if (this.inputDone || this.shuttingDown) this.maybeFinish()
      else if (this.phase === 'transmission') this.pump()
    }
  }

  /** Reports an answered request; unknown commands are not reported (they have no op). */
  private observe(observer: NbdRequestObserver, header: RequestHeader, startedMs: number): void {
    const op = opOfCommand(header.type)
    if (op === null || this.exp === null) return
    observer.requestDone(this.exp.name, op, (this.options.clock.now() - startedMs) / 1000)
  }

  /** Ends the socket once the client is done (DISC/EOF) or the server shuts down, and nothing is in flight. */
  private maybeFinish(): void {
    if (this.inFlight > 0 || this.phase === 'closing' || this.phase === 'closed') return
    if (this.inputDone || this.shuttingDown) this.endSocket()
  }

  /** Returns the errno to refuse the request with, and why, or null if it is acceptable. */
  private validate(header: RequestHeader): [number, string] | null {
    const exp = this.exp!
    const flags = this.transmissionFlags
    const { type, offset, length } = header
    let allowed = (flags & TransmissionFlag.SEND_FUA) !== 0 ? CommandFlag.FUA : 0
    switch (type) {
      case Command.READ:
        if (this.structured) allowed |= CommandFlag.DF
        break
      case Command.WRITE_ZEROES:
        allowed |= CommandFlag.NO_HOLE
        if ((flags & TransmissionFlag.SEND_FAST_ZERO) !== 0) allowed |= CommandFlag.FAST_ZERO
        break
      case Command.BLOCK_STATUS:
        allowed |= CommandFlag.REQ_ONE
        break
      case Command.WRITE:
      case Command.FLUSH:
      case Command.TRIM:
      case Command.CACHE:
        break
      default:
        return [NbdErrno.EINVAL, `unknown command ${type}`]
    }
    if ((header.flags & ~allowed) !== 0) {
      return [NbdErrno.EINVAL, `flags 0x${header.flags.toString(16)} not valid for ${nameOfCommand(type)}`]
    }
    const isWrite = type === Command.WRITE || type === Command.WRITE_ZEROES || type === Command.TRIM
    if (isWrite && (flags & TransmissionFlag.READ_ONLY) !== 0) return [NbdErrno.EPERM, `export '${exp.name}' is read-only`]
    if (type === Command.TRIM && (flags & TransmissionFlag.SEND_TRIM) === 0) return [NbdErrno.EINVAL, 'trim is not supported']
    if (type === Command.FLUSH) {
      if (offset !== 0 || length !== 0) return [NbdErrno.EINVAL, 'flush offset and length must be 0']
      return null
    }
    const size = exp.device.sizeBytes
    if (offset + length > size) {
      const errno = type === Command.WRITE || type === Command.WRITE_ZEROES ? NbdErrno.ENOSPC : NbdErrno.EINVAL
      return [errno, `range ${offsetText(header)}+${length} is beyond the end of the export (${size} bytes)`]
    }
    if ((type === Command.READ || type === Command.WRITE) && length > MAX_PAYLOAD_BYTES) {
      return [NbdErrno.EINVAL, `${nameOfCommand(type)} of ${length} bytes exceeds the maximum payload ${MAX_PAYLOAD_BYTES}`]
    }
    if (type === Command.BLOCK_STATUS) {
      if (this.contexts.length === 0 || !this.structured) return [NbdErrno.EINVAL, 'no meta context was selected']
      if (length === 0) return [NbdErrno.EINVAL, 'block status of length 0']
    }
    return null
  }

  private async handleRequest(header: RequestHeader, payload: Buffer | null): Promise<void> {
    if (this.shuttingDown) {
      this.replyError(header, NbdErrno.ESHUTDOWN, 'server is shutting down')
      return
    }
    const gone = this.exp?.withdrawn?.() ?? null
    if (gone !== null) {
      this.replyError(header, NbdErrno.ESHUTDOWN, gone)
      return
    }
    const refusal = this.validate(header)
    if (refusal !== null) {
      this.replyError(header, refusal[0], refusal[1])
      return
    }
    const exp = this.exp!
    const device = exp.device
    const fua = (header.flags & CommandFlag.FUA) !== 0
    try {
      switch (header.type) {
        case Command.READ: {
          // Zeroed, not allocUnsafe: if a device ever under-fills, stale heap must not reach the wire.
          const data = Buffer.alloc(header.length)
          await device.readInto(data, header.offset)
          this.replyRead(header, data)
          return
        }
        case Command.WRITE: {
          await device.write(payload!, header.offset, { fua: fua && device.capabilities.fua })
          if (fua && !device.capabilities.fua) await device.flush()
          break
        }
        case Command.FLUSH:
          await device.flush()
          break
        case Command.TRIM:
          await device.discard(header.offset, header.length)
          if (fua) await device.flush()
          break
        case Command.WRITE_ZEROES:
          if (!(await this.writeZeroes(exp, header))) return
          if (fua) await device.flush()
          break
        case Command.CACHE:
          // A prefetch hint; every device here is either memory or page-cached, so nothing to do.
          break
        case Command.BLOCK_STATUS:
          await this.blockStatus(exp, header)
          return
      }
      this.replyOk(header)
    } catch (err) {
      // A request in flight when the export went away fails because it did (device closed or
      // handed to a merge): the client is told to disconnect, not that its disk is bad.
      const gone = exp.withdrawn?.() ?? null
      const errno = gone !== null ? NbdErrno.ESHUTDOWN : nbdErrnoFor(err, header.type)
      const message = gone ?? describeError(err)
      const level = errno === NbdErrno.EIO ? 'warn' : 'debug'
      this.log[level](`${this.label}: ${nameOfCommand(header.type)} ${header.offset}+${header.length} failed: ${message}`)
      this.replyError(header, errno, message, true)
    }
  }

  /** Returns false if it already replied (FAST_ZERO refused). */
  private async writeZeroes(exp: NbdExport, header: RequestHeader): Promise<boolean> {
    const device = exp.device
    const mayPunch = (header.flags & CommandFlag.NO_HOLE) === 0 && device.capabilities.discard
    if ((header.flags & CommandFlag.FAST_ZERO) !== 0 && !(mayPunch && exp.fastZero !== false)) {
      this.replyError(header, NbdErrno.ENOTSUP, 'zeroing this range is not faster than writing')
      return false
    }
    if (mayPunch) {
      // BlockDevice contract: a discarded range reads back as zeros.
      await device.discard(header.offset, header.length)
      return true
    }
    const end = header.offset + header.length
    const zeros = Buffer.alloc(Math.min(ZERO_PIECE_BYTES, header.length))
    for (let at = header.offset; at < end; at += ZERO_PIECE_BYTES) {
      // One buffer for every piece: a device does not keep what it was given (BlockDevice contract).
      await device.write(zeros.subarray(0, Math.min(ZERO_PIECE_BYTES, end - at)), at)
    }
    return true
  }

  private async blockStatus(exp: NbdExport, header: RequestHeader): Promise<void> {
    const reqOne = (header.flags & CommandFlag.REQ_ONE) !== 0
    const chunks: Buffer[] = []
    for (let i = 0; i < this.contexts.length; i++) {
      const context = this.contexts[i]!
      let raw: readonly Extent[] | undefined
      if (exp.blockStatus) raw = await exp.blockStatus(context, header.offset, header.length)
      const extents = normalizeExtents(raw ?? [], header.length, reqOne)
      chunks.push(buildBlockStatusChunk(0, header.cookieHi, header.cookieLo, i + 1, extents))
    }
    // The last chunk carries DONE, so the reply needs no extra NONE chunk.
    const last = chunks[chunks.length - 1]!
    last.writeUInt16BE(ReplyFlag.DONE, 4)
    for (const chunk of chunks) this.send(chunk)
  }

  // ----------------------------------------------------------------- replies

  private replyOk(header: RequestHeader): void {
    this.send(
      this.structured ? buildNoneChunk(header.cookieHi, header.cookieLo) : buildSimpleReply(header.cookieHi, header.cookieLo, 0),
    )
  }

  private replyRead(header: RequestHeader, data: Buffer): void {
    if (!this.structured) {
      this.send(buildSimpleReply(header.cookieHi, header.cookieLo, 0))
      if (data.length > 0) this.send(data)
    } else if (data.length === 0) {
      // OFFSET_DATA needs at least one byte; an empty read is simply a success.
      this.send(buildNoneChunk(header.cookieHi, header.cookieLo))
    } else {
      // All data is in hand before the header goes out, so DONE can ride on the data chunk.
      this.send(buildOffsetDataHeader(ReplyFlag.DONE, header.cookieHi, header.cookieLo, header.offset, data.length))
      this.send(data)
    }
  }

  private replyError(header: RequestHeader, errno: number, message: string, logged = false): void {
    if (!logged) {
      this.log.debug(`${this.label}: ${nameOfCommand(header.type)} ${offsetText(header)}+${header.length} -> ${nameOfErrno(errno)}: ${message}`)
    }
    this.send(
      this.structured
        ? buildErrorChunk(ReplyFlag.DONE, header.cookieHi, header.cookieLo, errno, message)
        : buildSimpleReply(header.cookieHi, header.cookieLo, errno),
    )
  }

  /** Queues bytes; everything sent in one tick leaves in one batch. */
  private send(buf: Buffer): void {
    const socket = this.socket
    if (socket.destroyed || !socket.writable) return
    if (!this.corked) {
      this.corked = true
      socket.cork()
      setImmediate(this.uncork)
    }
    socket.write(buf)
    // Not write()'s own verdict: that trips at 16 KiB, i.e. after a handful of 4 KiB replies, and
    // pausing the reader that often costs a loop turn per batch. Any size above the stream's
    // high-water mark still guarantees a 'drain' event to unblock us.
    if (socket.writableLength > MAX_UNSENT_BYTES) this.writeBlocked = true
  }

  private readonly uncork = (): void => {
    if (!this.corked) return
    this.corked = false
    this.socket.uncork()
  }

  private endSocket(): void {
    if (this.phase === 'closing' || this.phase === 'closed') return
    this.phase = 'closing'
    this.dropAssembling()
    this.uncork()
    this.socket.end()
    // A socket paused for back-pressure never sees the peer's EOF, and a half-open socket never
    // closes: keep reading (onData ignores it now) and give the peer a moment to finish.
    this.socket.resume()
    clearTimeout(this.graceTimer)
    this.graceTimer = setTimeout(() => this.destroy(), CLOSE_LINGER_MS)
    this.graceTimer.unref()
  }

  private hardClose(): void {
    this.phase = 'closing'
    this.dropAssembling()
    this.queue.clear()
    this.socket.destroy()
    this.rawSocket.destroy()
  }
}

/**
 * Makes a provider's extents valid on the wire: non-empty, positive lengths, inside the request,
 * one descriptor under REQ_ONE, at most 2^20 descriptors, neighbours with equal flags merged.
 * An empty or useless answer becomes one "allocated data" descriptor, always a safe status.
 */
export function normalizeExtents(raw: readonly Extent[], requestLength: number, reqOne: boolean): Extent[] {
  const out: { length: number; flags: number }[] = []
  let covered = 0
  for (const extent of raw) {
    if (covered >= requestLength || out.length >= MAX_BLOCK_STATUS_EXTENTS) break
    if (!Number.isSafeInteger(extent.length) || extent.length <= 0) break
    const length = Math.min(extent.length, requestLength - covered)
    const flags = extent.flags >>> 0
    const previous = out[out.length - 1]
    if (previous !== undefined && previous.flags === flags) previous.length += length
    else out.push({ length, flags })
    covered += length
    if (reqOne) break
  }
  if (out.length === 0) return [{ length: requestLength, flags: 0 }]
  if (reqOne) out.length = 1
  return out
}
