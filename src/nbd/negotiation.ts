/**
 * The server side of the fixed newstyle handshake for one connection: the client flags, then
 * every option up to GO/EXPORT_NAME. It owns what the options negotiate (structured replies,
 * meta contexts, the TLS peer) and answers each option in order; the connection owns the socket
 * and hands it the options one at a time.
 *
 * Design notes:
 * - The export provider is synchronous, so every option is answered before the next is parsed,
 *   as the protocol requires.
 * - INFO and GO compute their answer from the same state, so they always agree (nbd-server 3.24
 *   does not, see the reference).
 * - Client-chosen names reach logs and error messages only through shownName().
 */
import { SnapError } from '../errors.js'
import {
  BaseAllocation,
  ClientFlag,
  Info,
  MAX_PAYLOAD_BYTES,
  MIN_BLOCK_BYTES,
  Option,
  PREFERRED_BLOCK_BYTES,
  Rep,
  TransmissionFlag,
  nameOfOption,
} from '../protocol/nbd/constants.js'
import {
  buildExportNameReply,
  buildInfoBlockSize,
  buildInfoDescription,
  buildInfoExport,
  buildInfoName,
  buildOptionError,
  buildOptionReply,
  buildRepMetaContext,
  buildRepServer,
  decodeString,
  parseInfoRequest,
  parseMetaContextRequest,
} from '../protocol/nbd/handshake.js'
import { isRefused, type ExportProvider, type NbdExport } from './export.js'
import type { NbdLogger } from './logger.js'
import type { TlsContext, TlsPeer } from './tls.js'

/** A client broke a MUST of the protocol: the only answer is to drop its connection. */
export const violation = (message: string) => new SnapError('NBD_PROTOCOL', message)

/** Longest client-chosen export name quoted in logs and errors. */
const SHOWN_NAME_CHARS = 64

/** A client-chosen name as logs show it: a client may send 64 KiB names, once per connection. */
export function shownName(name: string): string {
  const cut = name.length <= SHOWN_NAME_CHARS ? name : `${name.slice(0, SHOWN_NAME_CHARS)}…`
  // The bytes are the client's: a newline or a terminal escape must not break or forge a log line.
  return cut.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
}

/** What the negotiation needs from the connection that carries it. */
export interface NegotiationHost {
  readonly label: string
  readonly log: NbdLogger
  readonly exports: ExportProvider
  readonly tls: TlsContext | null
  readonly shuttingDown: boolean
  /** Bytes received and not yet parsed (STARTTLS must be followed by none). */
  readonly bufferedBytes: number
  send(buf: Buffer): void
  /** Soft close after ABORT. */
  endSocket(): void
  /** The STARTTLS ACK is sent: hand the socket to the TLS layer; tlsEstablished() follows. */
  startTls(tls: TlsContext): void
  /** GO or EXPORT_NAME succeeded: transmission starts with these flags. */
  enterTransmission(exp: NbdExport, flags: number): void
}

export class ServerNegotiation {
  private readonly host: NegotiationHost
  private noZeroes = false
  /** Who the client authenticated as, once TLS is up (null: plaintext so far). */
  private peer: TlsPeer | null = null
  private structuredReplies = false
  /** Meta contexts chosen by the last SET_META_CONTEXT, by id, and the export they were for. */
  private contexts: string[] = []
  private contextExport: string | null = null

  constructor(host: NegotiationHost) {
    this.host = host
  }

  get structured(): boolean {
    return this.structuredReplies
  }

  get tlsPeer(): TlsPeer | null {
    return this.peer
  }

  /** The contexts selected for `exp` (ids are index + 1); empty unless the last SET named it. */
  contextsFor(exp: NbdExport): readonly string[] {
    return this.contextExport === exp.name ? this.contexts : []
  }

  acceptClientFlags(flags: number): void {
    // Unknown bits, or bits we did not offer: the spec says drop the connection.
    if ((flags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)) !== 0) {
      throw violation(`unknown client flags 0x${flags.toString(16)}`)
    }
    this.noZeroes = (flags & ClientFlag.NO_ZEROES) !== 0
  }

  /** STARTTLS succeeded: it forgets everything negotiated before it. */
  tlsEstablished(peer: TlsPeer): void {
    this.peer = peer
    this.structuredReplies = false
    this.contexts = []
    this.contextExport = null
  }

  handleOption(code: number, data: Buffer): void {
    this.host.log.debug(`${this.host.label}: ${nameOfOption(code)} (${data.length} bytes)`)
    if (code === Option.ABORT) {
      this.host.send(buildOptionReply(code, Rep.ACK))
      this.host.endSocket()
      return
    }
    if (this.host.shuttingDown) {
      if (code === Option.EXPORT_NAME) throw violation('EXPORT_NAME during shutdown')
      this.optionError(code, Rep.ERR_SHUTDOWN, 'server is shutting down')
      return
    }
    const tlsRequired = this.host.tls?.mode === 'require' && this.peer === null
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

  optionError(code: number, type: number, message: string): void {
    this.host.log.debug(`${this.host.label}: ${nameOfOption(code)} refused: ${message}`)
    this.host.send(buildOptionError(code, type, message))
  }

  /** Resolves a client-supplied name; '' is the provider's own '' export or else its first one. */
  private resolveExport(name: string): NbdExport | { refused: string } | undefined {
    const provider = this.host.exports
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
    if (this.structuredReplies) flags |= TransmissionFlag.SEND_DF
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
    this.host.send(buildExportNameReply(exp.device.sizeBytes, flags, this.noZeroes))
    this.host.enterTransmission(exp, flags)
  }

  private optList(data: Buffer): void {
    if (data.length !== 0) return this.optionError(Option.LIST, Rep.ERR_INVALID, 'LIST takes no data')
    for (const exp of this.host.exports.list()) {
      this.host.send(buildRepServer(Option.LIST, exp.name, exp.description ?? ''))
    }
    this.host.send(buildOptionReply(Option.LIST, Rep.ACK))
  }

  private optStartTls(data: Buffer): void {
    const tlsContext = this.host.tls
    if (tlsContext === null) return this.optionError(Option.STARTTLS, Rep.ERR_UNSUP, 'TLS is not enabled on this server')
    if (data.length !== 0) return this.optionError(Option.STARTTLS, Rep.ERR_INVALID, 'STARTTLS takes no data')
    if (this.peer !== null) return this.optionError(Option.STARTTLS, Rep.ERR_INVALID, 'TLS is already active')
    // The client must wait for our ACK before starting TLS, so bytes already here are garbage
    // (and could not be handed to the TLS layer, which reads the handle directly).
    if (this.host.bufferedBytes > 0) throw violation('data after STARTTLS before the TLS handshake')
    this.host.send(buildOptionReply(Option.STARTTLS, Rep.ACK))
    this.host.startTls(tlsContext)
  }

  private optStructuredReply(data: Buffer): void {
    if (data.length !== 0) return this.optionError(Option.STRUCTURED_REPLY, Rep.ERR_INVALID, 'STRUCTURED_REPLY takes no data')
    if (this.structuredReplies) return this.optionError(Option.STRUCTURED_REPLY, Rep.ERR_INVALID, 'structured replies already negotiated')
    this.structuredReplies = true
    this.host.send(buildOptionReply(Option.STRUCTURED_REPLY, Rep.ACK))
  }

  private optInfoGo(code: number, data: Buffer): void {
    const request = parseInfoRequest(data)
    if ('error' in request) return this.optionError(code, Rep.ERR_INVALID, request.error)
    const exp = this.resolveExport(request.name)
    if (exp === undefined) return this.optionError(code, Rep.ERR_UNKNOWN, `no export named '${shownName(request.name)}'`)
    if (isRefused(exp)) return this.optionError(code, Rep.ERR_POLICY, exp.refused)
    // INFO and GO compute the same answer from the same state, so they always agree.
    const flags = this.computeFlags(exp)
    this.host.send(buildInfoExport(code, exp.device.sizeBytes, flags))
    if (request.infos.includes(Info.NAME)) this.host.send(buildInfoName(code, exp.name))
    if (request.infos.includes(Info.DESCRIPTION) && exp.description) this.host.send(buildInfoDescription(code, exp.description))
    // Sent even unasked: the constraints are the defaults anyway, and clients ignore extras.
    this.host.send(buildInfoBlockSize(code, MIN_BLOCK_BYTES, PREFERRED_BLOCK_BYTES, MAX_PAYLOAD_BYTES))
    this.host.send(buildOptionReply(code, Rep.ACK))
    if (code === Option.GO) this.host.enterTransmission(exp, flags)
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
    if (isSet && !this.structuredReplies) return this.optionError(code, Rep.ERR_INVALID, 'negotiate structured replies first')
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
    chosen.forEach((name, index) => this.host.send(buildRepMetaContext(code, isSet ? index + 1 : 0, name)))
    this.host.send(buildOptionReply(code, Rep.ACK))
  }
}
