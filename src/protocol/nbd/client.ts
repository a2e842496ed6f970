/**
 * The client's half of the wire codec: option requests and the server's option replies, request
 * headers, and an incremental parser for simple and structured replies. Pure (no sockets), the
 * mirror image of handshake.ts, request.ts and reply.ts, which serve the server's half.
 *
 * Design notes:
 * - A frame the client cannot make sense of (bad magic, a chunk too short for its type, an
 *   unknown non-error chunk type) is a protocol violation: the spec's answer is to hang up, so it
 *   is thrown as NBD_PROTOCOL and the connection drops.
 * - Cookies are u32 on our side (the high half is always 0): unique among a connection's
 *   in-flight requests is all the spec asks, and a number never allocates.
 * - A simple reply carries no length, so the parser asks its owner how many data bytes a
 *   successful reply to that cookie brings (the READ length, or 0).
 */
import { SnapError } from '../../errors.js'
import { ByteQueue, readU64, writeU64 } from './byte-queue.js'
import {
  GREETING_BYTES,
  HandshakeFlag,
  IHAVEOPT_HI,
  IHAVEOPT_LO,
  Info,
  NBD_MAGIC_HI,
  NBD_MAGIC_LO,
  OPTION_REPLY_HEADER_BYTES,
  OPTION_REPLY_MAGIC_HI,
  OPTION_REPLY_MAGIC_LO,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
  ReplyType,
  SIMPLE_REPLY_HEADER_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_MAGIC,
} from './constants.js'

const violation = (message: string) => new SnapError('NBD_PROTOCOL', message)

/** Returns the server's handshake flags; throws unless it speaks fixed newstyle. */
export function parseGreeting(buf: Buffer): number {
  if (buf.length < GREETING_BYTES) throw violation('short greeting')
  if (buf.readUInt32BE(0) !== NBD_MAGIC_HI || buf.readUInt32BE(4) !== NBD_MAGIC_LO) throw violation('not an NBD server (bad greeting magic)')
  if (buf.readUInt32BE(8) !== IHAVEOPT_HI || buf.readUInt32BE(12) !== IHAVEOPT_LO) {
    throw violation('server speaks oldstyle NBD, which is not supported')
  }
  const flags = buf.readUInt16BE(16)
  if ((flags & HandshakeFlag.FIXED_NEWSTYLE) === 0) throw violation('server does not speak fixed newstyle NBD')
  return flags
}

export function buildClientFlags(flags: number): Buffer {
  const buf = Buffer.alloc(4)
  buf.writeUInt32BE(flags, 0)
  return buf
}

export function buildOptionRequest(option: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const buf = Buffer.alloc(16 + data.length)
  buf.writeUInt32BE(IHAVEOPT_HI, 0)
  buf.writeUInt32BE(IHAVEOPT_LO, 4)
  buf.writeUInt32BE(option, 8)
  buf.writeUInt32BE(data.length, 12)
  buf.set(data, 16)
  return buf
}

/** The data of NBD_OPT_INFO / NBD_OPT_GO: export name and the info types asked for. */
export function buildInfoRequestData(exportName: string, infos: readonly number[]): Buffer {
  const name = Buffer.from(exportName, 'utf8')
  const buf = Buffer.alloc(4 + name.length + 2 + 2 * infos.length)
  buf.writeUInt32BE(name.length, 0)
  name.copy(buf, 4)
  buf.writeUInt16BE(infos.length, 4 + name.length)
  infos.forEach((info, i) => buf.writeUInt16BE(info, 6 + name.length + 2 * i))
  return buf
}

export interface OptionReplyHeader {
  readonly option: number
  readonly type: number
  readonly length: number
}

export function parseOptionReplyHeader(buf: Buffer): OptionReplyHeader {
  if (buf.length < OPTION_REPLY_HEADER_BYTES) throw violation('short option reply')
  if (buf.readUInt32BE(0) !== OPTION_REPLY_MAGIC_HI || buf.readUInt32BE(4) !== OPTION_REPLY_MAGIC_LO) {
    throw violation('bad option reply magic')
  }
  return { option: buf.readUInt32BE(8), type: buf.readUInt32BE(12), length: buf.readUInt32BE(16) }
}

export type InfoReply =
  | { readonly info: 'export'; readonly sizeBytes: number; readonly transmissionFlags: number }
  | { readonly info: 'block-size'; readonly minimum: number; readonly preferred: number; readonly maximum: number }
  | { readonly info: 'other'; readonly type: number }

/** Decodes the data of an NBD_REP_INFO reply; unknown types are for the caller to ignore. */
export function parseInfoReply(data: Buffer): InfoReply {
  if (data.length < 2) throw violation('NBD_REP_INFO without a type')
  const type = data.readUInt16BE(0)
  if (type === Info.EXPORT) {
    if (data.length !== 12) throw violation(`NBD_INFO_EXPORT of ${data.length} bytes`)
    return { info: 'export', sizeBytes: readU64(data, 2), transmissionFlags: data.readUInt16BE(10) }
  }
  if (type === Info.BLOCK_SIZE) {
    if (data.length !== 14) throw violation(`NBD_INFO_BLOCK_SIZE of ${data.length} bytes`)
    return { info: 'block-size', minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) }
  }
  return { info: 'other', type }
}

/** The reply to NBD_OPT_EXPORT_NAME (size, flags; any padding is the caller's to skip). */
export function parseExportNameReply(buf: Buffer): { readonly sizeBytes: number; readonly transmissionFlags: number } {
  return { sizeBytes: readU64(buf, 0), transmissionFlags: buf.readUInt16BE(8) }
}

/** A compact request header; a WRITE's payload follows it. */
export function buildRequestHeader(flags: number, type: number, cookie: number, offset: number, length: number): Buffer {
  const buf = Buffer.allocUnsafe(REQUEST_HEADER_BYTES)
  buf.writeUInt32BE(REQUEST_MAGIC, 0)
  buf.writeUInt16BE(flags, 4)
  buf.writeUInt16BE(type, 6)
  buf.writeUInt32BE(0, 8)
  buf.writeUInt32BE(cookie, 12)
  writeU64(buf, offset, 16)
  buf.writeUInt32BE(length, 24)
  return buf
}

export type ReplyEvent =
  /** A simple reply; `data` only for a successful one whose cookie expects data. */
  | { readonly kind: 'simple'; readonly cookie: number; readonly error: number; readonly data: Buffer | null }
  | { readonly kind: 'chunk'; readonly cookie: number; readonly done: boolean; readonly chunk: ReplyChunk }

export type ReplyChunk =
  | { readonly type: 'none' }
  | { readonly type: 'data'; readonly offset: number; readonly data: Buffer }
  | { readonly type: 'hole'; readonly offset: number; readonly length: number }
  | { readonly type: 'error'; readonly error: number; readonly message: string; readonly offset: number | null }
  /** A chunk type we did not ask for (BLOCK_STATUS): the request it belongs to ignores it. */
  | { readonly type: 'other'; readonly replyType: number }

/** Incremental parser of transmission-phase replies over split buffers. */
export class ReplyParser {
  private readonly queue: ByteQueue
  private readonly dataBytesOf: (cookie: number) => number
  private simple: { cookie: number; error: number; dataBytes: number } | null = null
  private structured: { flags: number; type: number; cookie: number; length: number } | null = null

  /** `dataBytesOf(cookie)`: data bytes a successful simple reply to that request carries. */
  constructor(queue: ByteQueue, dataBytesOf: (cookie: number) => number) {
    this.queue = queue
    this.dataBytesOf = dataBytesOf
  }

  next(): ReplyEvent | null {
    if (this.simple === null && this.structured === null) {
      const magic = this.peekMagic()
      if (magic === null) return null
      if (magic === SIMPLE_REPLY_MAGIC) {
        const raw = this.queue.take(SIMPLE_REPLY_HEADER_BYTES)
        if (raw === null) return null
        if (raw.readUInt32BE(8) !== 0) throw violation('reply for a cookie never sent')
        const cookie = raw.readUInt32BE(12)
        const error = raw.readUInt32BE(4)
        this.simple = { cookie, error, dataBytes: error === 0 ? this.dataBytesOf(cookie) : 0 }
      } else if (magic === STRUCTURED_REPLY_MAGIC) {
        const raw = this.queue.take(STRUCTURED_REPLY_HEADER_BYTES)
        if (raw === null) return null
        if (raw.readUInt32BE(8) !== 0) throw violation('reply for a cookie never sent')
        this.structured = { flags: raw.readUInt16BE(4), type: raw.readUInt16BE(6), cookie: raw.readUInt32BE(12), length: raw.readUInt32BE(16) }
      } else {
        throw violation(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`)
      }
    }
    if (this.simple !== null) {
      const { cookie, error, dataBytes } = this.simple
      let data: Buffer | null = null
      if (dataBytes > 0) {
        data = this.queue.take(dataBytes)
        if (data === null) return null
      }
      this.simple = null
      return { kind: 'simple', cookie, error, data }
    }
    const header = this.structured!
    const payload = this.queue.take(header.length)
    if (payload === null) return null
    this.structured = null
    return { kind: 'chunk', cookie: header.cookie, done: (header.flags & 1) !== 0, chunk: decodeChunk(header.type, payload) }
  }

  private peekMagic(): number | null {
    return this.queue.peekU32()
  }
}

function decodeChunk(type: number, payload: Buffer): ReplyChunk {
  switch (type) {
    case ReplyType.NONE:
      if (payload.length !== 0) throw violation('NONE chunk with a payload')
      return { type: 'none' }
    case ReplyType.OFFSET_DATA:
      if (payload.length < 9) throw violation('OFFSET_DATA chunk without data')
      return { type: 'data', offset: readU64(payload, 0), data: payload.subarray(8) }
    case ReplyType.OFFSET_HOLE:
      if (payload.length !== 12) throw violation(`OFFSET_HOLE chunk of ${payload.length} bytes`)
      return { type: 'hole', offset: readU64(payload, 0), length: payload.readUInt32BE(8) }
    case ReplyType.BLOCK_STATUS:
      return { type: 'other', replyType: type }
  }
  if ((type & 0x8000) !== 0) {
    // Every error type starts with error and message; unknown ones still fail just the request.
    if (payload.length < 6) throw violation('error chunk too short')
    const messageBytes = payload.readUInt16BE(4)
    if (6 + messageBytes > payload.length) throw violation('error chunk message runs past its payload')
    const message = payload.toString('utf8', 6, 6 + messageBytes)
    const offset = type === ReplyType.ERROR_OFFSET && payload.length >= 14 + messageBytes ? readU64(payload, 6 + messageBytes) : null
    return { type: 'error', error: payload.readUInt32BE(0) || 5, message, offset }
  }
  throw violation(`unknown reply chunk type ${type}`)
}
