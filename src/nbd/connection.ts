/**
 * One NBD client: the fixed newstyle handshake, then the transmission phase.
 *
 * Design notes:
 * - This file owns the socket: reading, the phases, back-pressure, reply framing and closing.
 *   What the bytes mean lives elsewhere: the pure wire codec in src/protocol/nbd/, the option
 *   negotiation in negotiation.ts, request execution against the device in dispatch.ts.
 * - Bytes go into one ByteQueue shared by the option parser and the request parser, so bytes a
 *   client pipelines right after GO are not lost in the hand-over.
 * - Where the server allows it (plain sockets), this connection picks the buffer of every socket
 *   read (direct-receive.ts): in transmission, the rest of a WRITE payload being assembled is
 *   read straight into its pooled buffer, and other bytes into one scratch buffer that is reused
 *   (what is left of it after parsing is copied). Otherwise bytes arrive as 'data' events.
 * - Transmission is pipelined: requests are parsed as they arrive and dispatched at once; each
 *   runs concurrently and replies when it completes, so replies go out of order. Replies written
 *   in the same tick are batched with cork/uncork.
 * - Back-pressure: parsing stops (and the socket is paused) while too many requests or too many
 *   payload bytes are in flight, or while the socket's write buffer is full. Memory per client is
 *   therefore bounded by the limits plus one request. Across clients, the server's PendingBytes
 *   bounds the total the same way: a WRITE's payload counts from the moment its header is read
 *   (reading on is then admitted), so no client reads a payload the server has no room for.
 * - Validation is one step (validateRequest), the wire-side twin of BaseBlockDevice's checked
 *   boundary; errors become wire errnos only through errno.ts.
 * - Nothing thrown by a client's bytes or by a device escapes: protocol violations close this
 *   socket with a one-line log, device errors become error replies. Other connections are never
 *   touched.
 */
import type { Socket } from 'node:net'
import type { TLSSocket } from 'node:tls'
import { isSnapError } from '../errors.js'
import { ByteQueue } from '../protocol/nbd/byte-queue.js'
import { CLIENT_FLAGS_BYTES, Command, MAX_HANDSHAKE_OPTIONS, MAX_PAYLOAD_BYTES, NbdErrno, Option, ReplyFlag, Rep, nameOfCommand, nameOfErrno } from '../protocol/nbd/constants.js'
import { OptionParser, buildGreeting, parseClientFlags } from '../protocol/nbd/handshake.js'
import { buildErrorChunk, buildNoneChunk, buildOffsetDataHeader, buildSimpleReply } from '../protocol/nbd/reply.js'
import { RequestParser, offsetText, type RequestHeader } from '../protocol/nbd/request.js'
import { validateRequest, type NegotiatedSession } from '../protocol/nbd/validate.js'
import type { Clock } from '../util/clock.js'
import { dispatchRequest, type DispatchTarget, type RequestReplies } from './dispatch.js'
import { describeError } from './errno.js'
import type { ExportProvider, NbdExport } from './export.js'
import type { NbdLogger } from './logger.js'
import type { NbdClientFault, NbdFaultListener } from './client-fault.js'
import { ServerNegotiation, shownName, violation, type NegotiationHost } from './negotiation.js'
import type { PayloadPool } from './payload-pool.js'
import type { PendingBytes } from './pending-bytes.js'
import { opOfCommand, type NbdRequestObserver } from './request-observer.js'
import { describePeer, type TlsContext, type TlsPeer } from './tls.js'
import { adoptForDirectReceive, type DirectReader } from './direct-receive.js'

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
  /** Told about client errors (client-fault.ts); absent: they are only logged. */
  readonly onFault?: NbdFaultListener
  /**
   * The socket may be adopted for direct receive (direct-receive.ts): it comes from a server
   * created with pauseOnConnect and no TLS. Otherwise it is read through 'data' events.
   */
  readonly directReceive?: boolean
  /** Bytes of a direct-receive read that has no payload to land in. */
  readonly readBufferBytes: number
}

type Phase = 'client-flags' | 'options' | 'starttls' | 'transmission' | 'closing' | 'closed'

/** How long a shutting-down server keeps answering ERR_SHUTDOWN to a client still in the handshake. */
const SHUTDOWN_HANDSHAKE_GRACE_MS = 1000

/** How long an ended socket may wait for the peer to close its side before it is destroyed. */
const CLOSE_LINGER_MS = 2000

/** Reply bytes queued on the socket beyond which we stop taking new requests. */
const MAX_UNSENT_BYTES = 4 * 1024 * 1024

/** Where the read in progress lands, in direct-receive mode. */
type ReadTarget = 'fresh' | 'scratch' | 'payload'

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
  private readonly negotiation: ServerNegotiation
  /** Options received so far in the handshake (MAX_HANDSHAKE_OPTIONS). */
  private optionCount = 0
  private exp: NbdExport | null = null
  /** Fixed at GO/EXPORT_NAME: what requests are validated against and how replies are framed. */
  private session: NegotiatedSession | null = null
  private dispatchTarget: DispatchTarget | null = null
  private structured = false
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
  /** Errnos of failed requests already reported to onFault. */
  private reportedErrnos: Set<number> | null = null
  /** Whether this connection picks the buffer of each socket read (direct-receive.ts). */
  private readonly direct: boolean
  private readTarget: ReadTarget = 'fresh'
  /** The reused buffer of direct reads that no payload is waiting for. */
  private scratch: Buffer | null = null

  constructor(accepted: Socket, options: ConnectionOptions) {
    // Before the adoption: it asks directReader for the first read buffer at once.
    this.options = options
    const adopted = options.directReceive === true ? adoptForDirectReceive(accepted, this.directReader, { allowHalfOpen: true }) : null
    const socket = adopted ?? accepted
    this.direct = adopted !== null
    this.id = options.id
    this.socket = socket
    this.rawSocket = socket
    this.log = options.logger
    this.label = `nbd conn#${options.id} ${socket.remoteAddress ?? 'unix'}${socket.remotePort ? `:${socket.remotePort}` : ''}`
    this.optionParser = new OptionParser(this.queue)
    this.negotiation = new ServerNegotiation(this.negotiationHost())
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

  private fault(kind: NbdClientFault['kind'], message: string, request?: { command: string; errno: number }): void {
    const onFault = this.options.onFault
    if (!onFault) return
    if (request) {
      this.reportedErrnos ??= new Set()
      if (this.reportedErrnos.has(request.errno)) return
      this.reportedErrnos.add(request.errno)
    }
    const exportName = this.exp === null ? null : shownName(this.exp.name)
    onFault({
      kind,
      client: this.label,
      export: exportName,
      message,
      ...(request ? { command: request.command, errno: nameOfErrno(request.errno) } : {}),
    })
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
          this.fault('handshake-timeout', `handshake not finished within ${limit} ms`)
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
    socket.on('end', this.onEnd)
    socket.on('error', this.onError)
    socket.on('close', this.onClose)
    socket.on('drain', this.onDrain)
    if (this.direct) return
    socket.on('data', this.onData)
    // A socket accepted paused (for adoption that did not happen) does not flow by itself.
    socket.resume()
  }

  private readonly onData = (chunk: Buffer): void => {
    if (this.phase === 'closing' || this.phase === 'closed') return
    this.queue.push(chunk)
    this.pump()
  }

  /** Picks the buffer of each socket read, and takes in what it got (direct-receive mode). */
  private readonly directReader: DirectReader = {
    nextReadBuffer: () => {
      if (this.phase === 'transmission') {
        const tail = this.requestParser!.payloadTail()
        if (tail !== null) {
          this.readTarget = 'payload'
          return tail
        }
      }
      if (this.phase === 'client-flags' || this.phase === 'options') {
        // Handshake bytes may be kept as views (option data): each read gets its own buffer.
        this.readTarget = 'fresh'
        return Buffer.allocUnsafe(this.options.readBufferBytes)
      }
      this.readTarget = 'scratch'
      this.scratch ??= Buffer.allocUnsafeSlow(this.options.readBufferBytes)
      return this.scratch
    },
    onRead: (bytes, buffer) => {
      if (this.phase === 'closing' || this.phase === 'closed') return
      if (this.readTarget === 'payload') {
        try {
          this.requestParser!.payloadReceived(bytes)
        } catch (err) {
          this.failed(err)
          return
        }
        this.pump()
        return
      }
      const transient = this.readTarget === 'scratch'
      this.queue.push(buffer.subarray(0, bytes), transient)
      this.pump()
      // The scratch buffer takes the next read: keep what was not parsed yet.
      if (transient) this.queue.ownTransient()
    },
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
      this.failed(err)
    }
  }

  /** A protocol violation or a bug while taking in the client's bytes: one log line, and the socket closes. */
  private failed(err: unknown): void {
    if (isSnapError(err, 'NBD_PROTOCOL')) {
      this.log.warn(`${this.label}: ${err.message}; disconnecting`)
      this.fault('protocol', err.message)
    } else {
      this.log.error(`${this.label}: internal error: ${describeError(err)}; disconnecting`)
      this.fault('internal', describeError(err))
    }
    this.hardClose()
  }

  // ---------------------------------------------------------------- handshake

  private pumpHandshake(): void {
    if (this.phase === 'client-flags') {
      const raw = this.queue.take(CLIENT_FLAGS_BYTES)
      if (raw === null) return
      this.negotiation.acceptClientFlags(parseClientFlags(raw))
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
        this.negotiation.optionError(event.code, Rep.ERR_TOO_BIG, `option data of ${event.length} bytes is too large`)
        continue
      }
      this.negotiation.handleOption(event.code, event.data)
    }
    if (this.phase === 'options' && this.writeBlocked) this.socket.pause()
  }

  /** The connection as the negotiation sees it. */
  private negotiationHost(): NegotiationHost {
    const connection = this
    return {
      label: this.label,
      log: this.log,
      exports: this.options.exports,
      tls: this.options.tls,
      get shuttingDown() {
        return connection.shuttingDown
      },
      get bufferedBytes() {
        return connection.queue.length
      },
      send: (buf) => this.send(buf),
      endSocket: () => this.endSocket(),
      startTls: (tls) => this.startTls(tls),
      enterTransmission: (exp, flags) => this.enterTransmission(exp, flags),
    }
  }

  /** STARTTLS was acknowledged: the TLS layer takes over the socket. */
  private startTls(tlsContext: TlsContext): void {
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
          if (this.phase !== 'closing') {
            this.log.warn(`${this.label}: TLS client refused: ${reason}`)
            this.fault('tls', `TLS client refused: ${reason}`)
          }
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
    this.negotiation.tlsEstablished(peer)
    this.phase = 'options'
    secure.on('data', this.onData)
    secure.on('end', this.onEnd)
    secure.on('error', (err: Error) => {
      this.log.warn(`${this.label}: TLS error: ${describeError(err)}`)
      this.fault('tls', `TLS error: ${describeError(err)}`)
      this.rawSocket.destroy()
    })
    secure.on('drain', this.onDrain)
    this.pump()
  }

  private enterTransmission(exp: NbdExport, flags: number): void {
    const structured = this.negotiation.structured
    const tlsPeer = this.negotiation.tlsPeer
    // Contexts only count if the last SET named this export.
    const contexts = this.negotiation.contextsFor(exp)
    this.exp = exp
    this.structured = structured
    this.session = {
      exportName: exp.name,
      // Read per request, as before the split: a device's size is whatever it is now.
      get sizeBytes() {
        return exp.device.sizeBytes
      },
      transmissionFlags: flags,
      structured,
      hasContexts: contexts.length > 0,
    }
    this.dispatchTarget = {
      exp,
      contexts,
      label: this.label,
      log: this.log,
      replies: this.replies,
      requestFailed: (command, errno, message) => this.fault('request', message, { command, errno }),
    }
    this.requestParser = new RequestParser(MAX_PAYLOAD_BYTES, this.queue, (n) => this.options.payloads.acquire(n))
    this.phase = 'transmission'
    this.cancelHandshakeTimer?.()
    this.options.onExportServed(exp)
    this.log.info(
      `${this.label}: serving '${exp.name}' (${exp.device.sizeBytes} bytes, flags 0x${flags.toString(16)}` +
        `${structured ? ', structured' : ''}${tlsPeer ? `, tls, ${describePeer(tlsPeer)}` : ''})`,
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
      this.fault('internal', `${nameOfCommand(header.type)}: ${describeError(err)}`)
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
    const refusal = validateRequest(header, this.session!)
    if (refusal !== null) {
      this.fault('request', refusal[1], { command: nameOfCommand(header.type), errno: refusal[0] })
      this.replyError(header, refusal[0], refusal[1])
      return
    }
    await dispatchRequest(this.dispatchTarget!, header, payload)
  }

  // ----------------------------------------------------------------- replies

  /** The replies dispatch answers through, framed as negotiated. */
  private readonly replies: RequestReplies = {
    ok: (header) => this.replyOk(header),
    read: (header, data) => this.replyRead(header, data),
    error: (header, errno, message, logged) => this.replyError(header, errno, message, logged),
    chunks: (chunks) => {
      // The last chunk carries DONE, so the reply needs no extra NONE chunk.
      chunks[chunks.length - 1]!.writeUInt16BE(ReplyFlag.DONE, 4)
      for (const chunk of chunks) this.send(chunk)
    },
  }

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
