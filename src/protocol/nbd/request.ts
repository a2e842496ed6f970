/**
 * Transmission-phase request parser (compact 28-byte headers), incremental over split buffers.
 *
 * Design notes:
 * - The cookie is kept as two u32 halves: it is opaque, only echoed, and bigint would allocate on
 *   every request.
 * - Offsets are read as hi * 2^32 + lo. Above 2^53 they lose precision but stay above 2^53, and
 *   no device is that large, so range checks remain exact without bigint. The two halves are
 *   kept as well, so an error message can quote the offset the client sent exactly
 *   (offsetText).
 * - WRITE payloads up to `maxPayloadBytes` are returned whole. Larger ones are drained as they
 *   arrive, never buffered, and reported as `dropped` so the connection can answer an error and
 *   stay in sync with the stream (what nbdkit, qemu-nbd and nbd-server all do).
 * - A payload already received whole is taken as it lies (a view when it sits in one chunk); one
 *   still arriving is copied into its own buffer chunk by chunk, so received chunks do not pile
 *   up for the length of a 32 MiB payload: many short-lived socket buffers at once fragment the
 *   allocator's heap, which then stays at its peak size after the clients are gone.
 * - A caller that picks the buffer of each socket read can skip that copy: once a payload is
 *   being assembled and nothing else is buffered, payloadTail() is where the next bytes belong.
 *   A payload taken whole out of a transient chunk (a reused read buffer) is copied, since the
 *   request outlives the next read.
 * - The parser never validates semantics (flags, ranges): that is the connection's job, which
 *   keeps this layer a pure framing codec.
 */
import { ByteQueue, readU64 } from './byte-queue.js'
import { Command, REQUEST_HEADER_BYTES, REQUEST_MAGIC } from './constants.js'

export interface RequestHeader {
  readonly flags: number
  readonly type: number
  readonly cookieHi: number
  readonly cookieLo: number
  readonly offset: number
  /** The offset's u32 halves, exact where `offset` rounds (above 2^53). */
  readonly offsetHi: number
  readonly offsetLo: number
  readonly length: number
}

/** The request's offset in decimal, exact at any size (error paths only: it allocates a bigint). */
export function offsetText(header: RequestHeader): string {
  return ((BigInt(header.offsetHi) << 32n) | BigInt(header.offsetLo)).toString()
}

export type RequestEvent =
  | { readonly kind: 'request'; readonly header: RequestHeader; readonly payload: Buffer | null }
  /** A WRITE whose payload exceeded the limit; the payload has been read and discarded. */
  | { readonly kind: 'dropped'; readonly header: RequestHeader }
  | { readonly kind: 'bad-magic'; readonly magic: number }

export function parseRequestHeader(raw: Uint8Array): RequestHeader | { readonly badMagic: number } {
  const buf = Buffer.isBuffer(raw) ? raw : Buffer.from(raw.buffer, raw.byteOffset, raw.length)
  const magic = buf.readUInt32BE(0)
  if (magic !== REQUEST_MAGIC) return { badMagic: magic }
  return {
    flags: buf.readUInt16BE(4),
    type: buf.readUInt16BE(6),
    cookieHi: buf.readUInt32BE(8),
    cookieLo: buf.readUInt32BE(12),
    offset: readU64(buf, 16),
    offsetHi: buf.readUInt32BE(16),
    offsetLo: buf.readUInt32BE(20),
    length: buf.readUInt32BE(24),
  }
}

export class RequestParser {
  private readonly queue: ByteQueue
  private readonly maxPayloadBytes: number
  /** A WRITE header whose payload is still arriving. */
  private pending: RequestHeader | null = null
  private skipRemaining = 0
  /** The buffer a still-arriving payload is copied into, and how much of it is filled. */
  private assembling: Buffer | null = null
  private assembledBytes = 0
  private readonly alloc: ((n: number) => Buffer) | undefined

  /** `alloc` provides the buffers WRITE payloads are assembled in (default: fresh ones). */
  constructor(maxPayloadBytes: number, queue: ByteQueue = new ByteQueue(), alloc?: (n: number) => Buffer) {
    this.maxPayloadBytes = maxPayloadBytes
    this.queue = queue
    this.alloc = alloc
  }

  push(chunk: Uint8Array): void {
    this.queue.push(chunk)
  }

  /** Bytes buffered but not yet consumed (a bound on memory held per connection). */
  get bufferedBytes(): number {
    return this.queue.length
  }

  /**
   * The length of the WRITE payload now arriving (its header is read, the payload is not
   * complete); 0 when none is, or when an oversized one is being drained.
   */
  get awaitedPayloadBytes(): number {
    return this.pending !== null && this.skipRemaining === 0 ? this.pending.length : 0
  }

  /**
   * Where the next received bytes belong when they can go straight into a payload: the unfilled
   * part of the one being assembled, once every buffered byte has been taken into it. Null
   * otherwise (bytes then go through push()).
   */
  payloadTail(): Buffer | null {
    const assembling = this.assembling
    if (assembling === null || this.queue.length > 0) return null
    return assembling.subarray(this.assembledBytes)
  }

  /** `n` bytes were received into payloadTail(). */
  payloadReceived(n: number): void {
    const assembling = this.assembling
    if (assembling === null || this.queue.length > 0 || this.assembledBytes + n > assembling.length) {
      throw new Error(`${n} bytes received into a payload tail that is not there`)
    }
    this.assembledBytes += n
  }

  next(): RequestEvent | null {
    if (this.pending === null) {
      const raw = this.queue.take(REQUEST_HEADER_BYTES)
      if (raw === null) return null
      const header = parseRequestHeader(raw)
      if ('badMagic' in header) return { kind: 'bad-magic', magic: header.badMagic }
      if (header.type !== Command.WRITE) return { kind: 'request', header, payload: null }
      this.pending = header
      this.skipRemaining = header.length > this.maxPayloadBytes ? header.length : 0
    }
    const header = this.pending
    if (this.skipRemaining > 0) {
      this.skipRemaining -= this.queue.skip(this.skipRemaining)
      if (this.skipRemaining > 0) return null
      this.pending = null
      return { kind: 'dropped', header }
    }
    if (this.assembling === null) {
      const whole = this.queue.take(header.length, this.alloc, true)
      if (whole !== null) {
        this.pending = null
        return { kind: 'request', header, payload: whole }
      }
      this.assembling = (this.alloc ?? Buffer.allocUnsafe)(header.length)
      this.assembledBytes = 0
    }
    this.assembledBytes += this.queue.takeInto(this.assembling, this.assembledBytes)
    if (this.assembledBytes < header.length) return null
    const payload = this.assembling
    this.assembling = null
    this.pending = null
    return { kind: 'request', header, payload }
  }
}
