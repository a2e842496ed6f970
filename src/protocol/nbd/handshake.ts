/**
 * Handshake codec: the server greeting, the option request framing (incremental, for split
 * buffers), option replies and the payloads of INFO/GO and the META_CONTEXT options.
 *
 * Pure: no sockets, no exports, no policy. Parsers return either a value or an `error` string
 * that the connection turns into NBD_REP_ERR_INVALID, because a malformed option is the client's
 * problem to hear about, not an exception.
 */
import { ByteQueue, writeU64 } from './byte-queue.js'
import {
  EXPORT_NAME_PADDING_BYTES,
  GREETING_BYTES,
  HandshakeFlag,
  IHAVEOPT_HI,
  IHAVEOPT_LO,
  Info,
  MAX_OPTION_DATA_BYTES,
  MAX_STRING_BYTES,
  NBD_MAGIC_HI,
  NBD_MAGIC_LO,
  OPTION_HEADER_BYTES,
  OPTION_REPLY_HEADER_BYTES,
  OPTION_REPLY_MAGIC_HI,
  OPTION_REPLY_MAGIC_LO,
  Rep,
} from './constants.js'

export function buildGreeting(flags: number = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES): Buffer {
  const buf = Buffer.alloc(GREETING_BYTES)
  buf.writeUInt32BE(NBD_MAGIC_HI, 0)
  buf.writeUInt32BE(NBD_MAGIC_LO, 4)
  buf.writeUInt32BE(IHAVEOPT_HI, 8)
  buf.writeUInt32BE(IHAVEOPT_LO, 12)
  buf.writeUInt16BE(flags, 16)
  return buf
}

export function parseClientFlags(buf: Uint8Array): number {
  return Buffer.from(buf.buffer, buf.byteOffset, buf.length).readUInt32BE(0)
}

export type OptionEvent =
  | { readonly kind: 'option'; readonly code: number; readonly data: Buffer }
  /** Data longer than we are willing to buffer; it has been skipped. */
  | { readonly kind: 'too-big'; readonly code: number; readonly length: number }
  | { readonly kind: 'bad-magic' }

/**
 * Incremental option-request parser. Oversized option data is drained as it arrives (never
 * buffered), then reported as `too-big` so the connection can answer ERR_TOO_BIG and go on.
 */
export class OptionParser {
  private readonly queue: ByteQueue
  private header: { code: number; length: number } | null = null
  private skipRemaining = 0

  constructor(queue: ByteQueue = new ByteQueue()) {
    this.queue = queue
  }

  push(chunk: Uint8Array): void {
    this.queue.push(chunk)
  }

  next(): OptionEvent | null {
    if (this.header === null) {
      const raw = this.queue.take(OPTION_HEADER_BYTES)
      if (raw === null) return null
      if (raw.readUInt32BE(0) !== IHAVEOPT_HI || raw.readUInt32BE(4) !== IHAVEOPT_LO) return { kind: 'bad-magic' }
      const length = raw.readUInt32BE(12)
      this.header = { code: raw.readUInt32BE(8), length }
      this.skipRemaining = length > MAX_OPTION_DATA_BYTES ? length : 0
    }
    const { code, length } = this.header
    if (this.skipRemaining > 0) {
      this.skipRemaining -= this.queue.skip(this.skipRemaining)
      if (this.skipRemaining > 0) return null
      this.header = null
      return { kind: 'too-big', code, length }
    }
    const data = this.queue.take(length)
    if (data === null) return null
    this.header = null
    return { kind: 'option', code, data }
  }

  /** Bytes received after the last parsed option (handed to the transmission parser after GO). */
  get remaining(): ByteQueue {
    return this.queue
  }
}

export function buildOptionReply(option: number, type: number, data?: Uint8Array): Buffer {
  const length = data?.length ?? 0
  const buf = Buffer.alloc(OPTION_REPLY_HEADER_BYTES + length)
  buf.writeUInt32BE(OPTION_REPLY_MAGIC_HI, 0)
  buf.writeUInt32BE(OPTION_REPLY_MAGIC_LO, 4)
  buf.writeUInt32BE(option, 8)
  buf.writeUInt32BE(type, 12)
  buf.writeUInt32BE(length, 16)
  if (data) buf.set(data, OPTION_REPLY_HEADER_BYTES)
  return buf
}

/** An error reply (type has bit 31 set) carrying a human-readable message. */
export function buildOptionError(option: number, type: number, message = ''): Buffer {
  return buildOptionReply(option, type, Buffer.from(truncateUtf8(message)))
}

/** The reply to NBD_OPT_EXPORT_NAME: no option-reply header, optional 124 zero bytes. */
export function buildExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const buf = Buffer.alloc(10 + (noZeroes ? 0 : EXPORT_NAME_PADDING_BYTES))
  writeU64(buf, sizeBytes, 0)
  buf.writeUInt16BE(transmissionFlags, 8)
  return buf
}

export function buildInfoExport(option: number, sizeBytes: number, transmissionFlags: number): Buffer {
  const data = Buffer.alloc(12)
  data.writeUInt16BE(Info.EXPORT, 0)
  writeU64(data, sizeBytes, 2)
  data.writeUInt16BE(transmissionFlags, 10)
  return buildOptionReply(option, Rep.INFO, data)
}

function buildInfoString(option: number, type: number, text: string): Buffer {
  const body = Buffer.from(truncateUtf8(text))
  const data = Buffer.alloc(2 + body.length)
  data.writeUInt16BE(type, 0)
  body.copy(data, 2)
  return buildOptionReply(option, Rep.INFO, data)
}

export const buildInfoName = (option: number, name: string) => buildInfoString(option, Info.NAME, name)
export const buildInfoDescription = (option: number, text: string) => buildInfoString(option, Info.DESCRIPTION, text)

export function buildInfoBlockSize(option: number, minimum: number, preferred: number, maximum: number): Buffer {
  const data = Buffer.alloc(14)
  data.writeUInt16BE(Info.BLOCK_SIZE, 0)
  data.writeUInt32BE(minimum, 2)
  data.writeUInt32BE(preferred, 6)
  data.writeUInt32BE(maximum, 10)
  return buildOptionReply(option, Rep.INFO, data)
}

/** NBD_REP_SERVER: u32 name length, name, then the description filling the rest. */
export function buildRepServer(option: number, name: string, description = ''): Buffer {
  const nameBytes = Buffer.from(name)
  const descBytes = Buffer.from(truncateUtf8(description))
  const data = Buffer.alloc(4 + nameBytes.length + descBytes.length)
  data.writeUInt32BE(nameBytes.length, 0)
  nameBytes.copy(data, 4)
  descBytes.copy(data, 4 + nameBytes.length)
  return buildOptionReply(option, Rep.SERVER, data)
}

export function buildRepMetaContext(option: number, contextId: number, name: string): Buffer {
  const nameBytes = Buffer.from(name)
  const data = Buffer.alloc(4 + nameBytes.length)
  data.writeUInt32BE(contextId, 0)
  nameBytes.copy(data, 4)
  return buildOptionReply(option, Rep.META_CONTEXT, data)
}

export interface InfoRequest {
  readonly name: string
  readonly infos: readonly number[]
}

/** Parses NBD_OPT_INFO / NBD_OPT_GO data: u32 N, name, u16 K, K × u16 info types. */
export function parseInfoRequest(data: Buffer): InfoRequest | { readonly error: string } {
  if (data.length < 6) return { error: `option data too short (${data.length} bytes)` }
  const nameLength = data.readUInt32BE(0)
  if (nameLength > data.length - 6) return { error: `export name length ${nameLength} runs past the option data` }
  const name = decodeString(data, 4, nameLength)
  if (typeof name !== 'string') return name
  const count = data.readUInt16BE(4 + nameLength)
  if (data.length !== 6 + nameLength + 2 * count) return { error: `info request count ${count} does not match the option length` }
  const infos: number[] = []
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLength + 2 * i))
  return { name, infos }
}

export interface MetaContextRequest {
  readonly name: string
  readonly queries: readonly string[]
}

/** Parses LIST/SET_META_CONTEXT data: u32 N, name, u32 Q, Q × (u32 M, query). */
export function parseMetaContextRequest(data: Buffer): MetaContextRequest | { readonly error: string } {
  if (data.length < 8) return { error: `option data too short (${data.length} bytes)` }
  const nameLength = data.readUInt32BE(0)
  if (nameLength > data.length - 8) return { error: `export name length ${nameLength} runs past the option data` }
  const name = decodeString(data, 4, nameLength)
  if (typeof name !== 'string') return name
  const count = data.readUInt32BE(4 + nameLength)
  let at = 8 + nameLength
  const queries: string[] = []
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return { error: `query ${i} of ${count} runs past the option data` }
    const length = data.readUInt32BE(at)
    at += 4
    if (length > data.length - at) return { error: `query ${i} length ${length} runs past the option data` }
    const query = decodeString(data, at, length)
    if (typeof query !== 'string') return query
    queries.push(query)
    at += length
  }
  if (at !== data.length) return { error: `${data.length - at} trailing bytes after the queries` }
  return { name, queries }
}

/** Strict: a name that is not UTF-8 must not decode (with U+FFFD) to some export's name. */
const utf8 = new TextDecoder('utf-8', { fatal: true })

/**
 * A client string as the spec defines it: at most 4096 bytes of UTF-8 without NUL. Returns the
 * string, or why it is not one.
 */
export function decodeString(data: Buffer, at: number, length: number): string | { readonly error: string } {
  if (length > MAX_STRING_BYTES) return { error: `string of ${length} bytes exceeds ${MAX_STRING_BYTES}` }
  const bytes = data.subarray(at, at + length)
  if (bytes.includes(0)) return { error: 'string contains a NUL byte' }
  try {
    return utf8.decode(bytes)
  } catch {
    return { error: 'string is not valid UTF-8' }
  }
}

/** Messages and descriptions must stay within the spec's 4096-byte string limit. */
function truncateUtf8(text: string): string {
  const bytes = Buffer.from(text)
  if (bytes.length <= MAX_STRING_BYTES) return text
  // Cut on a character boundary: decoding a sliced buffer may end in U+FFFD, so re-trim by chars.
  let out = bytes.subarray(0, MAX_STRING_BYTES).toString('utf8')
  while (Buffer.byteLength(out) > MAX_STRING_BYTES) out = out.slice(0, -1)
  return out
}
