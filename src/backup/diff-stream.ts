/**
 * The export-diff stream (docs/diff-format.md is the specification; keep the two in step).
 *
 * A stream is a sequence of records, each a 32-byte head, a payload and the SHA-256 of head and
 * payload. The first record is the header (JSON: sizes and names), then data and zero records in
 * strictly increasing offset order, then a trailer holding the SHA-256 of every earlier record's
 * digest in order: per-record digests find a damaged record where it is, the chain finds records
 * dropped, repeated or reordered as whole records. SHA-256 because node:crypto has it natively
 * (OpenSSL, hundreds of MB/s and more) and it leaves no doubt; node:crypto has no CRC-32C, and
 * a JavaScript one would be the slowest part of the pipeline.
 *
 * The reader checks everything it can as it goes and throws SNAP_CORRUPT_METADATA naming the
 * first problem; a caller applies nothing until the reader has reached the trailer and the end
 * of input (see import-diff.ts).
 */
import { createHash } from 'node:crypto'
import { SnapError } from '../errors.js'

export const STREAM_FORMAT = 'blocksnap-diff'
export const STREAM_VERSION = 1
/** ASCII "BSDR" at the start of every record. */
const RECORD_MAGIC = 0x52445342
export const HEAD_BYTES = 32
export const DIGEST_BYTES = 32
/** Largest data record payload (and header JSON). */
export const MAX_RECORD_DATA_BYTES = 4 * 1024 * 1024

export const RECORD_HEADER = 0x48 // 'H'
export const RECORD_DATA = 0x44 // 'D'
export const RECORD_ZERO = 0x5a // 'Z'
export const RECORD_TRAILER = 0x54 // 'T'

export interface StreamHeader {
  readonly format: typeof STREAM_FORMAT
  readonly version: typeof STREAM_VERSION
  readonly sizeBytes: number
  /** Snapshot the stream starts from; null for a full stream. */
  readonly from: string | null
  /** Snapshot the stream brings a target to (it is created there on import). */
  readonly to: string
  /** Granule of the extents (the diff's granularity, or B's chunk size for a full stream). */
  readonly granularityBytes: number
  /** Chunk size of B on the source, used for the snapshot the import creates. */
  readonly chunkSizeBytes: number
}

export type StreamRecord =
  | { readonly type: 'data'; readonly offset: number; readonly data: Uint8Array }
  | { readonly type: 'zero'; readonly offset: number; readonly length: number }

export interface StreamTotals {
  readonly records: number
  readonly dataBytes: number
  readonly zeroBytes: number
  readonly streamBytes: number
}

function corrupt(message: string): SnapError {
  return new SnapError('SNAP_CORRUPT_METADATA', `invalid or corrupt diff stream: ${message}`)
}

/** Produces a stream record by record; `emit` receives the bytes in order. */
export class DiffStreamWriter {
  private readonly emit: (bytes: Uint8Array) => Promise<void>
  private readonly chain = createHash('sha256')
  private sequence = 0
  private dataBytes = 0
  private streamBytes = 0

  constructor(emit: (bytes: Uint8Array) => Promise<void>) {
    this.emit = emit
  }

  get bytesWritten(): number {
    return this.streamBytes
  }

  header(header: Omit<StreamHeader, 'format' | 'version'>): Promise<void> {
    const json = JSON.stringify({ format: STREAM_FORMAT, version: STREAM_VERSION, ...header })
    return this.record(RECORD_HEADER, 0, header.sizeBytes, Buffer.from(json, 'utf8'))
  }

  async data(offset: number, data: Uint8Array): Promise<void> {
    for (let done = 0; done < data.length; done += MAX_RECORD_DATA_BYTES) {
      const piece = data.subarray(done, done + MAX_RECORD_DATA_BYTES)
      this.dataBytes += piece.length
      await this.record(RECORD_DATA, offset + done, piece.length, piece)
    }
  }

  zero(offset: number, length: number): Promise<void> {
    return this.record(RECORD_ZERO, offset, length, new Uint8Array(0))
  }

  trailer(): Promise<void> {
    const records = this.sequence
    return this.record(RECORD_TRAILER, records, this.dataBytes, this.chain.copy().digest())
  }

  private async record(type: number, offset: number, length: number, payload: Uint8Array): Promise<void> {
    const head = Buffer.alloc(HEAD_BYTES)
    head.writeUInt32LE(RECORD_MAGIC, 0)
    head[4] = type
    head.writeBigUInt64LE(BigInt(offset), 8)
    head.writeBigUInt64LE(BigInt(length), 16)
    head.writeUInt32LE(payload.length, 24)
    head.writeUInt32LE(this.sequence++, 28)
    const digest = createHash('sha256').update(head).update(payload).digest()
    this.chain.update(digest)
    this.streamBytes += HEAD_BYTES + payload.length + DIGEST_BYTES
    await this.emit(head)
    if (payload.length > 0) await this.emit(payload)
    await this.emit(digest)
  }
}

/** Exact-length reads from an async byte source, keeping what a read leaves over. */
class ExactReader {
  private readonly source: AsyncIterator<Uint8Array>
  private pieces: Uint8Array[] = []
  private buffered = 0
  private ended = false
  consumed = 0

  constructor(source: AsyncIterable<Uint8Array>) {
    this.source = source[Symbol.asyncIterator]()
  }

  /** `n` bytes, or null when the input ends first (truncated). */
  async read(n: number): Promise<Uint8Array | null> {
    while (this.buffered < n && !this.ended) {
      const next = await this.source.next()
      if (next.done) this.ended = true
      else if (next.value.length > 0) {
        this.pieces.push(next.value)
        this.buffered += next.value.length
      }
    }
    if (this.buffered < n) return null
    const all = this.pieces.length === 1 ? (this.pieces[0] as Uint8Array) : Buffer.concat(this.pieces)
    const out = all.subarray(0, n)
    const rest = all.subarray(n)
    this.pieces = rest.length > 0 ? [rest] : []
    this.buffered = rest.length
    this.consumed += n
    return out
  }

  /** Whether the input has more bytes. */
  async atEnd(): Promise<boolean> {
    if (this.buffered > 0) return false
    return (await this.read(1)) === null
  }
}

function safeU64(buf: Uint8Array, at: number, what: string): number {
  const v = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength).readBigUInt64LE(at)
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${what} ${v} is out of range`)
  return Number(v)
}

function isChunkSize(n: unknown): n is number {
  return typeof n === 'number' && Number.isSafeInteger(n) && n >= 512 && n <= 512 * 1024 && (n & (n - 1)) === 0
}

function parseHeader(payload: Uint8Array, sizeField: number): StreamHeader {
  let h: Record<string, unknown>
  try {
    h = JSON.parse(Buffer.from(payload).toString('utf8')) as Record<string, unknown>
  } catch {
    throw corrupt('header is not JSON')
  }
  if (!h || typeof h !== 'object' || h.format !== STREAM_FORMAT) throw corrupt('not a blocksnap diff stream')
  if (h.version !== STREAM_VERSION) throw corrupt(`format version ${String(h.version)} is not supported (this blocksnap reads version ${STREAM_VERSION})`)
  const size = h.sizeBytes
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0 || size !== sizeField) throw corrupt('header size is inconsistent')
  if (typeof h.to !== 'string' || h.to === '') throw corrupt('header names no target snapshot')
  if (h.from !== null && (typeof h.from !== 'string' || h.from === '')) throw corrupt('header has a bad from snapshot')
  if (!isChunkSize(h.granularityBytes) || !isChunkSize(h.chunkSizeBytes)) throw corrupt('header has a bad granularity or chunk size')
  return {
    format: STREAM_FORMAT,
    version: STREAM_VERSION,
    sizeBytes: size,
    from: h.from as string | null,
    to: h.to,
    granularityBytes: h.granularityBytes,
    chunkSizeBytes: h.chunkSizeBytes,
  }
}

/**
 * Reads and checks a stream: `onHeader` once, then `onRecord` for each data and zero record in
 * order; resolves with the totals only after the trailer matched and the input ended. Any
 * problem throws SNAP_CORRUPT_METADATA; what the callbacks did before is the caller's to undo
 * (verify first, apply in a second pass).
 */
export async function readDiffStream(
  source: AsyncIterable<Uint8Array>,
  onHeader: (header: StreamHeader) => void | Promise<void>,
  onRecord: (record: StreamRecord) => void | Promise<void>,
): Promise<StreamTotals> {
  const reader = new ExactReader(source)
  const chain = createHash('sha256')
  let header: StreamHeader | null = null
  let sequence = 0
  let end = 0 // end of the last extent
  let dataBytes = 0
  let zeroBytes = 0
  for (;;) {
    const at = reader.consumed
    const head = await reader.read(HEAD_BYTES)
    if (!head) throw corrupt(at === 0 ? 'empty input' : `truncated at byte ${at} (no trailer)`)
    const view = Buffer.from(head.buffer, head.byteOffset, head.byteLength)
    if (view.readUInt32LE(0) !== RECORD_MAGIC) throw corrupt(`no record at byte ${at}`)
    const type = head[4]!
    const payloadBytes = view.readUInt32LE(24)
    if (view.readUInt32LE(28) !== sequence) throw corrupt(`record ${sequence} at byte ${at} is out of sequence`)
    if (head[5] !== 0 || head[6] !== 0 || head[7] !== 0) throw corrupt(`record ${sequence} at byte ${at} has reserved bits set`)
    const limit = type === RECORD_TRAILER ? DIGEST_BYTES : type === RECORD_ZERO ? 0 : MAX_RECORD_DATA_BYTES
    if (payloadBytes > limit) throw corrupt(`record ${sequence} at byte ${at} has a ${payloadBytes}-byte payload`)
    const rest = await reader.read(payloadBytes + DIGEST_BYTES)
    if (!rest) throw corrupt(`truncated in record ${sequence} at byte ${at}`)
    const payload = rest.subarray(0, payloadBytes)
    const digest = createHash('sha256').update(head).update(payload).digest()
    if (Buffer.compare(digest, rest.subarray(payloadBytes)) !== 0) throw corrupt(`record ${sequence} at byte ${at} fails its checksum`)
    const offset = safeU64(head, 8, 'offset')
    const length = safeU64(head, 16, 'length')
    if (sequence === 0) {
      if (type !== RECORD_HEADER) throw corrupt('does not start with a header record')
      header = parseHeader(payload, length)
      await onHeader(header)
    } else if (!header || type === RECORD_HEADER) {
      throw corrupt(`second header at byte ${at}`)
    } else if (type === RECORD_DATA || type === RECORD_ZERO) {
      if (length === 0 || (type === RECORD_DATA && length !== payloadBytes)) throw corrupt(`record ${sequence} at byte ${at} has a bad length`)
      if (offset < end || (header.from === null && offset !== end)) throw corrupt(`record ${sequence} at byte ${at} is out of order (offset ${offset}, previous end ${end})`)
      if (offset + length > header.sizeBytes) throw corrupt(`record ${sequence} at byte ${at} ends beyond the volume size ${header.sizeBytes}`)
      end = offset + length
      if (type === RECORD_DATA) dataBytes += length
      else zeroBytes += length
      await onRecord(type === RECORD_DATA ? { type: 'data', offset, data: payload } : { type: 'zero', offset, length })
    } else if (type === RECORD_TRAILER) {
      if (offset !== sequence || length !== dataBytes || payloadBytes !== DIGEST_BYTES || Buffer.compare(payload, chain.digest()) !== 0) {
        throw corrupt(`trailer at byte ${at} does not match the records before it`)
      }
      if (header.from === null && end !== header.sizeBytes) throw corrupt(`full stream covers ${end} of ${header.sizeBytes} bytes`)
      if (!(await reader.atEnd())) throw corrupt(`data after the trailer at byte ${reader.consumed}`)
      return { records: sequence + 1, dataBytes, zeroBytes, streamBytes: reader.consumed }
    } else {
      throw corrupt(`record ${sequence} at byte ${at} has unknown type ${type}`)
    }
    chain.update(digest)
    sequence++
  }
}
