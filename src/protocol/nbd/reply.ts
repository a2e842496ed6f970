/**
 * Reply serializers: simple replies and structured reply chunks (OFFSET_DATA, OFFSET_HOLE,
 * BLOCK_STATUS, ERROR, NONE).
 *
 * Data-carrying replies return only their header; the caller writes the data buffer right after
 * it (corked), so READ data is never copied into a combined buffer.
 */
import { writeU64 } from './byte-queue.js'
import {
  MAX_STRING_BYTES,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_HEADER_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_MAGIC,
} from './constants.js'

export interface Extent {
  readonly length: number
  readonly flags: number
}

/** Simple reply header; for a successful READ the data follows it. */
export function buildSimpleReply(cookieHi: number, cookieLo: number, error: number): Buffer {
  const buf = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES)
  buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0)
  buf.writeUInt32BE(error, 4)
  buf.writeUInt32BE(cookieHi, 8)
  buf.writeUInt32BE(cookieLo, 12)
  return buf
}

function chunkHeader(size: number, flags: number, type: number, cookieHi: number, cookieLo: number, payloadLength: number): Buffer {
  const buf = Buffer.allocUnsafe(size)
  buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0)
  buf.writeUInt16BE(flags, 4)
  buf.writeUInt16BE(type, 6)
  buf.writeUInt32BE(cookieHi, 8)
  buf.writeUInt32BE(cookieLo, 12)
  buf.writeUInt32BE(payloadLength, 16)
  return buf
}

/** A structured chunk header with no payload beyond `payloadLength` supplied by the caller. */
export function buildChunkHeader(flags: number, type: number, cookieHi: number, cookieLo: number, payloadLength: number): Buffer {
  return chunkHeader(STRUCTURED_REPLY_HEADER_BYTES, flags, type, cookieHi, cookieLo, payloadLength)
}

/** NBD_REPLY_TYPE_NONE with DONE: success for a command without reply data. */
export function buildNoneChunk(cookieHi: number, cookieLo: number): Buffer {
  return chunkHeader(STRUCTURED_REPLY_HEADER_BYTES, ReplyFlag.DONE, ReplyType.NONE, cookieHi, cookieLo, 0)
}

/** Header plus the u64 offset of an OFFSET_DATA chunk; `dataLength` bytes must follow. */
export function buildOffsetDataHeader(flags: number, cookieHi: number, cookieLo: number, offset: number, dataLength: number): Buffer {
  const buf = chunkHeader(STRUCTURED_REPLY_HEADER_BYTES + 8, flags, ReplyType.OFFSET_DATA, cookieHi, cookieLo, 8 + dataLength)
  writeU64(buf, offset, STRUCTURED_REPLY_HEADER_BYTES)
  return buf
}

export function buildOffsetHoleChunk(flags: number, cookieHi: number, cookieLo: number, offset: number, holeLength: number): Buffer {
  const buf = chunkHeader(STRUCTURED_REPLY_HEADER_BYTES + 12, flags, ReplyType.OFFSET_HOLE, cookieHi, cookieLo, 12)
  writeU64(buf, offset, STRUCTURED_REPLY_HEADER_BYTES)
  buf.writeUInt32BE(holeLength, STRUCTURED_REPLY_HEADER_BYTES + 8)
  return buf
}

export function buildBlockStatusChunk(
  flags: number,
  cookieHi: number,
  cookieLo: number,
  contextId: number,
  extents: readonly Extent[],
): Buffer {
  const payload = 4 + 8 * extents.length
  const buf = chunkHeader(STRUCTURED_REPLY_HEADER_BYTES + payload, flags, ReplyType.BLOCK_STATUS, cookieHi, cookieLo, payload)
  let at = STRUCTURED_REPLY_HEADER_BYTES
  buf.writeUInt32BE(contextId, at)
  at += 4
  for (const extent of extents) {
    buf.writeUInt32BE(extent.length, at)
    buf.writeUInt32BE(extent.flags >>> 0, at + 4)
    at += 8
  }
  return buf
}

/** NBD_REPLY_TYPE_ERROR: u32 error, u16 message length, message. */
export function buildErrorChunk(flags: number, cookieHi: number, cookieLo: number, error: number, message = ''): Buffer {
  let text = Buffer.from(message)
  if (text.length > MAX_STRING_BYTES) text = text.subarray(0, MAX_STRING_BYTES)
  const payload = 6 + text.length
  const buf = chunkHeader(STRUCTURED_REPLY_HEADER_BYTES + payload, flags, ReplyType.ERROR, cookieHi, cookieLo, payload)
  buf.writeUInt32BE(error, STRUCTURED_REPLY_HEADER_BYTES)
  buf.writeUInt16BE(text.length, STRUCTURED_REPLY_HEADER_BYTES + 4)
  text.copy(buf, STRUCTURED_REPLY_HEADER_BYTES + 6)
  return buf
}
