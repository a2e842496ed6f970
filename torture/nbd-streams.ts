/**
 * Client byte streams for NBD fuzzing, and an independent reading of both directions of a
 * connection (from the NBD protocol document; nothing shared with src/protocol/nbd).
 *
 * buildStream() writes a plausible session (fixed-newstyle flags, some options, GO or
 * EXPORT_NAME, a batch of requests) and remembers where its fields are, so mutate() can damage
 * fields as well as random bytes. readSession() splits the client stream into options and
 * requests the way the spec frames them, and follows the server's replies to learn where (and
 * whether) transmission began, which writes were acknowledged and what reads returned.
 */
import type { Random } from '../test/support/random.js'

export const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED: 8, LIST_META: 9, SET_META: 10, EXT: 11 }
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 }
const CMD_FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 }
const IHAVEOPT = Buffer.from('IHAVEOPT', 'ascii')
const REQUEST_MAGIC = 0x25609513
const SIMPLE_MAGIC = 0x67446698
const STRUCTURED_MAGIC = 0x668e33ef
const OPTION_REPLY_MAGIC = Buffer.from([0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9])
const REP_ACK = 1

interface Field {
  readonly at: number
  readonly bytes: number
  readonly kind: 'magic' | 'code' | 'length' | 'offset' | 'flags' | 'cookie' | 'type' | 'name'
}

export interface BuiltStream {
  readonly bytes: Buffer
  readonly fields: readonly Field[]
}

class Writer {
  readonly parts: Buffer[] = []
  length = 0
  readonly fields: Field[] = []
  put(buf: Buffer, kind?: Field['kind']): void {
    if (kind) this.fields.push({ at: this.length, bytes: buf.length, kind })
    this.parts.push(buf)
    this.length += buf.length
  }
  u16(v: number, kind?: Field['kind']): void {
    const b = Buffer.alloc(2)
    b.writeUInt16BE(v & 0xffff)
    this.put(b, kind)
  }
  u32(v: number, kind?: Field['kind']): void {
    const b = Buffer.alloc(4)
    b.writeUInt32BE(v >>> 0)
    this.put(b, kind)
  }
  u64(v: bigint, kind?: Field['kind']): void {
    const b = Buffer.alloc(8)
    b.writeBigUInt64BE(BigInt.asUintN(64, v))
    this.put(b, kind)
  }
  option(code: number, data: Buffer): void {
    this.put(IHAVEOPT, 'magic')
    this.u32(code, 'code')
    this.u32(data.length, 'length')
    this.put(data)
  }
}

function str32(text: string): Buffer {
  const name = Buffer.from(text, 'utf8')
  const len = Buffer.alloc(4)
  len.writeUInt32BE(name.length)
  return Buffer.concat([len, name])
}

function infoData(name: string, infos: number[]): Buffer {
  const count = Buffer.alloc(2 + 2 * infos.length)
  count.writeUInt16BE(infos.length)
  infos.forEach((info, i) => count.writeUInt16BE(info, 2 + 2 * i))
  return Buffer.concat([str32(name), count])
}

function metaData(name: string, queries: string[]): Buffer {
  const count = Buffer.alloc(4)
  count.writeUInt32BE(queries.length)
  return Buffer.concat([str32(name), count, ...queries.map(str32)])
}

export interface StreamShape {
  /** Export sizes by name, to aim requests mostly in range. */
  readonly sizes: ReadonlyMap<string, number>
}

export function buildStream(random: Random, shape: StreamShape): BuiltStream {
  const w = new Writer()
  w.u32(random.chance(0.7) ? 3 : random.chance(0.5) ? 1 : random.int(8), 'flags')
  const name = random.pick(['', 'mem', 'mem', 'ro', 'nope'])
  const size = shape.sizes.get(name === '' ? 'mem' : name) ?? 65536
  const structured = random.chance(0.5)
  const optionCount = random.int(4)
  for (let i = 0; i < optionCount; i++) {
    const roll = random.int(8)
    if (roll === 0) w.option(OPT.LIST, Buffer.alloc(0))
    else if (roll === 1) w.option(OPT.INFO, infoData(random.pick([name, 'mem', 'x']), [0, 1, 2, 3].slice(0, random.int(5))))
    else if (roll === 2) w.option(OPT.LIST_META, metaData(name, random.chance(0.5) ? ['base:'] : []))
    else if (roll === 3) w.option(OPT.STARTTLS, Buffer.alloc(0))
    else if (roll === 4) w.option(OPT.EXT, Buffer.alloc(0))
    else if (roll === 5) w.option(100 + random.int(100), random.bytes(random.int(20)) as Buffer)
    else w.option(OPT.STRUCTURED, Buffer.alloc(random.chance(0.9) ? 0 : 3))
  }
  if (structured) {
    w.option(OPT.STRUCTURED, Buffer.alloc(0))
    if (random.chance(0.5)) w.option(OPT.SET_META, metaData(name, ['base:allocation', ...(random.chance(0.3) ? ['blocksnap:exceptions'] : [])]))
  }
  if (random.chance(0.7)) w.option(OPT.GO, infoData(name, random.chance(0.5) ? [3] : []))
  else w.option(OPT.EXPORT_NAME, Buffer.from(name, 'utf8'))
  const requests = random.int(12)
  for (let i = 0; i < requests; i++) {
    const type = random.pick([CMD.READ, CMD.READ, CMD.WRITE, CMD.WRITE, CMD.WRITE, CMD.FLUSH, CMD.TRIM, CMD.WRITE_ZEROES, CMD.CACHE, CMD.BLOCK_STATUS])
    const length = type === CMD.FLUSH ? 0 : 1 + random.int(random.chance(0.8) ? 4096 : 3 * 65536)
    const offset = random.chance(0.9) ? random.int(Math.max(1, size - Math.min(length, size) + 1)) : random.int(2 * size)
    let flags = 0
    if (random.chance(0.2)) flags |= CMD_FLAG.FUA
    if (type === CMD.WRITE_ZEROES && random.chance(0.3)) flags |= random.chance(0.5) ? CMD_FLAG.NO_HOLE : CMD_FLAG.FAST_ZERO
    if (type === CMD.READ && random.chance(0.2)) flags |= CMD_FLAG.DF
    if (type === CMD.BLOCK_STATUS && random.chance(0.3)) flags |= CMD_FLAG.REQ_ONE
    w.u32(REQUEST_MAGIC, 'magic')
    w.u16(flags, 'flags')
    w.u16(type, 'type')
    w.u64(BigInt(i + 1) * 0x10001n, 'cookie')
    w.u64(BigInt(offset), 'offset')
    w.u32(length, 'length')
    if (type === CMD.WRITE) w.put(random.bytes(length) as Buffer)
  }
  if (random.chance(0.5)) {
    w.u32(REQUEST_MAGIC, 'magic')
    w.u16(0)
    w.u16(CMD.DISC, 'type')
    w.u64(0xdddn, 'cookie')
    w.u64(0n)
    w.u32(0)
  }
  return { bytes: Buffer.concat(w.parts), fields: w.fields }
}

/** Damages a built stream; returns the new bytes and the names of what was done. */
export function mutate(stream: BuiltStream, random: Random): { bytes: Buffer; mutations: string[] } {
  let bytes = Buffer.from(stream.bytes)
  const mutations: string[] = []
  const n = random.chance(0.1) ? 0 : 1 + (random.chance(0.4) ? random.int(3) : 0)
  for (let m = 0; m < n && bytes.length > 0; m++) {
    const field = stream.fields.length > 0 ? random.pick(stream.fields) : null
    const roll = random.int(10)
    if (roll === 0) {
      mutations.push('truncate')
      bytes = bytes.subarray(0, random.int(bytes.length))
    } else if (roll === 1) {
      mutations.push('bit flips')
      for (let i = 1 + random.int(4); i > 0; i--) bytes[random.int(bytes.length)]! ^= 1 << random.int(8)
    } else if (roll === 2) {
      mutations.push('garbage inserted')
      const at = random.int(bytes.length + 1)
      bytes = Buffer.concat([bytes.subarray(0, at), random.bytes(1 + random.int(64)), bytes.subarray(at)])
    } else if (roll === 3) {
      mutations.push('bytes deleted')
      const at = random.int(bytes.length)
      bytes = Buffer.concat([bytes.subarray(0, at), bytes.subarray(at + 1 + random.int(32))])
    } else if (roll === 4) {
      mutations.push('segment repeated')
      const at = random.int(bytes.length)
      const piece = bytes.subarray(at, at + 1 + random.int(200))
      bytes = Buffer.concat([bytes.subarray(0, at), piece, piece, bytes.subarray(at + piece.length)])
    } else if (field && field.at + field.bytes <= bytes.length) {
      const value = fieldValue(field, random)
      mutations.push(`${field.kind} field`)
      value.copy(bytes, field.at, 0, field.bytes)
    } else {
      mutations.push('garbage tail')
      bytes = Buffer.concat([bytes, random.bytes(1 + random.int(300))])
    }
  }
  return { bytes, mutations }
}

function fieldValue(field: Field, random: Random): Buffer {
  const out = Buffer.alloc(8)
  const big = random.pick([0xffffffff, 0x80000000, 0x7fffffff, 0x2000001, 0x10000, 0, 1, random.int(2 ** 32)])
  switch (field.kind) {
    case 'length':
    case 'offset':
      if (field.bytes === 8) out.writeBigUInt64BE(random.pick([2n ** 64n - 1n, 2n ** 63n, 2n ** 53n, 2n ** 32n, BigInt(random.int(2 ** 20)), 131071n, 131072n, 65536n]))
      else out.writeUInt32BE(big)
      break
    case 'code':
    case 'type':
    case 'flags':
      if (field.bytes === 2) out.writeUInt16BE(random.chance(0.5) ? random.int(16) : random.int(65536))
      else out.writeUInt32BE(random.chance(0.5) ? random.int(16) : big)
      break
    default:
      random.bytes(8).forEach((b, i) => (out[i] = b))
  }
  return out
}

// ---- reading a finished session -----------------------------------------------------------------

export interface WireRequest {
  readonly type: number
  readonly flags: number
  readonly cookie: bigint
  readonly offset: number
  readonly length: number
  readonly payload: Buffer | null
}

export interface ReadResult {
  readonly request: WireRequest
  /** Bytes the server returned for the request's range (undefined where a hole reply said zeros is exact). */
  readonly data: Buffer
}

export interface Session {
  /** Export the client entered transmission with ('' resolved to the default), or null. */
  exportName: string | null
  readonly requests: WireRequest[]
  /** WRITE requests the server acknowledged with success. */
  readonly ackedWrites: WireRequest[]
  readonly reads: ReadResult[]
  /**
   * Write-type requests (WRITE, WRITE_ZEROES, TRIM) that may have run, by export: those of the
   * confirmed transmission, and where the server's bytes stop before the handshake's outcome
   * (a server that hangs up on a violation drops its queued replies), those of every GO or
   * EXPORT_NAME in the client's bytes that could have started one.
   */
  readonly possibleWriters: Array<{ exportName: string; request: WireRequest }>
  /** Problems in the server's bytes (replies that do not fit what the client sent). */
  readonly violations: string[]
}

class Cursor {
  pos = 0
  readonly buf: Buffer
  constructor(buf: Buffer) {
    this.buf = buf
  }
  has(n: number): boolean {
    return this.pos + n <= this.buf.length
  }
  take(n: number): Buffer | null {
    if (!this.has(n)) return null
    const b = this.buf.subarray(this.pos, this.pos + n)
    this.pos += n
    return b
  }
}

/**
 * Follows client bytes `c` and server bytes `s`. Server bytes that break the protocol are
 * reported as violations; a connection the server ended early is not one.
 */
export function readSession(c: Buffer, s: Buffer, defaultExport: string): Session {
  const session: Session = { exportName: null, requests: [], ackedWrites: [], reads: [], possibleWriters: [], violations: [] }
  const cc = new Cursor(c)
  const sc = new Cursor(s)
  const greeting = sc.take(18)
  if (!greeting) return session
  if (greeting.toString('latin1', 0, 16) !== 'NBDMAGICIHAVEOPT') session.violations.push('bad greeting')
  const flags = cc.take(4)
  if (!flags) return session
  const noZeroes = (flags.readUInt32BE(0) & 2) !== 0
  let structured = false
  for (;;) {
    const head = cc.take(16)
    if (!head || !head.subarray(0, 8).equals(IHAVEOPT)) return session
    const code = head.readUInt32BE(8)
    const length = head.readUInt32BE(12)
    const data = cc.take(length) // null when the client stream ends inside the data
    if (code === OPT.EXPORT_NAME) {
      if (data === null) return session
      const reply = sc.take(10 + (noZeroes ? 0 : 124))
      if (!reply) return speculate(session, cc, head.length + data.length, defaultExport)
      session.exportName = data.toString('utf8') === '' ? defaultExport : data.toString('utf8')
      break
    }
    // Every other option is answered by replies ending in ACK or an error.
    let final = -1
    while (final === -1) {
      const r = sc.take(20)
      if (!r) return data === null ? session : speculate(session, cc, head.length + data.length, defaultExport)
      if (!r.subarray(0, 8).equals(OPTION_REPLY_MAGIC)) {
        session.violations.push('bad option reply magic')
        return session
      }
      if (r.readUInt32BE(8) !== code) {
        session.violations.push(`reply for option ${r.readUInt32BE(8)} to option ${code}`)
        return session
      }
      const type = r.readUInt32BE(12)
      if (!sc.take(r.readUInt32BE(16))) return data === null ? session : speculate(session, cc, head.length + data.length, defaultExport)
      if (type === REP_ACK || type >= 0x80000000) final = type
    }
    if (data === null) return session
    if (code === OPT.ABORT) return session
    if (code === OPT.STRUCTURED && final === REP_ACK) structured = true
    if (code === OPT.GO && final === REP_ACK) {
      const nameLength = data.readUInt32BE(0)
      const name = data.toString('utf8', 4, 4 + nameLength)
      session.exportName = name === '' ? defaultExport : name
      break
    }
  }
  session.requests.push(...readRequests(cc))
  for (const request of session.requests) if (isWriteType(request)) session.possibleWriters.push({ exportName: session.exportName as string, request })
  readReplies(sc, session, structured)
  return session
}

export const isWriteType = (r: WireRequest) => r.type === CMD.WRITE || r.type === CMD.WRITE_ZEROES || r.type === CMD.TRIM

function readRequests(cc: Cursor): WireRequest[] {
  const requests: WireRequest[] = []
  for (;;) {
    const head = cc.take(28)
    if (!head || head.readUInt32BE(0) !== REQUEST_MAGIC) break
    const type = head.readUInt16BE(6)
    const length = head.readUInt32BE(24)
    let payload: Buffer | null = null
    if (type === CMD.WRITE) {
      payload = cc.take(length)
      if (payload === null) break
    }
    const offset = Number(head.readBigUInt64BE(16))
    requests.push({ type, flags: head.readUInt16BE(4), cookie: head.readBigUInt64BE(8), offset, length, payload })
    if (type === CMD.DISC) break
  }
  return requests
}

/**
 * The server's bytes ended at the option that starts at `cc.pos - optionBytes`: from there on,
 * every GO or EXPORT_NAME may have entered transmission with the requests that follow it.
 */
function speculate(session: Session, cc: Cursor, optionBytes: number, defaultExport: string): Session {
  cc.pos -= optionBytes
  for (;;) {
    const head = cc.take(16)
    if (!head || !head.subarray(0, 8).equals(IHAVEOPT)) return session
    const code = head.readUInt32BE(8)
    const data = cc.take(head.readUInt32BE(12))
    if (data === null) return session
    let name: string | null = null
    if (code === OPT.EXPORT_NAME) name = data.toString('utf8')
    else if (code === OPT.GO && data.length >= 4 && data.readUInt32BE(0) <= data.length - 4) name = data.toString('utf8', 4, 4 + data.readUInt32BE(0))
    if (name === null) continue
    const exportName = name === '' ? defaultExport : name
    const after = new Cursor(cc.buf)
    after.pos = cc.pos
    for (const request of readRequests(after)) if (isWriteType(request)) session.possibleWriters.push({ exportName, request })
    if (code === OPT.EXPORT_NAME) return session // no option can follow it
  }
}

function readReplies(sc: Cursor, session: Session, structured: boolean): void {
  const byCookie = new Map<bigint, WireRequest[]>()
  for (const r of session.requests) {
    if (r.type === CMD.DISC) continue
    const list = byCookie.get(r.cookie) ?? []
    list.push(r)
    byCookie.set(r.cookie, list)
  }
  // With a reused cookie the replies cannot be told apart: check framing only from the first one.
  const unique = [...byCookie.values()].every((l) => l.length === 1)
  const answered = new Set<WireRequest>()
  const partial = new Map<WireRequest, { data: Buffer; error: boolean }>()
  while (sc.has(4)) {
    const magic = sc.buf.readUInt32BE(sc.pos)
    if (magic === SIMPLE_MAGIC) {
      const h = sc.take(16)
      if (!h) return
      const error = h.readUInt32BE(4)
      const cookie = h.readBigUInt64BE(8)
      const candidates = byCookie.get(cookie)
      if (!candidates) {
        session.violations.push(`simple reply for cookie ${cookie} nobody sent`)
        return
      }
      if (!unique) return
      const request = candidates[0] as WireRequest
      if (answered.has(request)) {
        session.violations.push(`second reply to cookie ${cookie}`)
        return
      }
      answered.add(request)
      if (structured && request.type === CMD.READ && error === 0) session.violations.push('simple reply to a successful READ after structured replies were negotiated')
      if (request.type === CMD.READ && error === 0) {
        const data = sc.take(request.length)
        if (!data) return
        session.reads.push({ request, data: Buffer.from(data) })
      }
      if (request.type === CMD.WRITE && error === 0) session.ackedWrites.push(request)
    } else if (magic === STRUCTURED_MAGIC) {
      if (!structured) session.violations.push('structured reply without negotiation')
      const h = sc.take(20)
      if (!h) return
      const flags = h.readUInt16BE(4)
      const type = h.readUInt16BE(6)
      const cookie = h.readBigUInt64BE(8)
      const body = sc.take(h.readUInt32BE(16))
      if (!body) return
      const candidates = byCookie.get(cookie)
      if (!candidates) {
        session.violations.push(`structured reply for cookie ${cookie} nobody sent`)
        return
      }
      if (!unique) return
      const request = candidates[0] as WireRequest
      if (answered.has(request)) {
        session.violations.push(`chunk after the final reply to cookie ${cookie}`)
        return
      }
      let state = partial.get(request)
      if (!state) {
        state = { data: Buffer.alloc(request.type === CMD.READ ? request.length : 0), error: false }
        partial.set(request, state)
      }
      if (type >= 0x8000) state.error = true
      else if (type === 1 || type === 2) {
        if (request.type !== CMD.READ) session.violations.push(`data chunk for a ${request.type} request`)
        const at = Number(body.readBigUInt64BE(0)) - request.offset
        const length = type === 1 ? body.length - 8 : body.readUInt32BE(8)
        if (at < 0 || at + length > request.length) {
          session.violations.push(`read chunk outside the request (cookie ${cookie})`)
          return
        }
        if (type === 1) body.copy(state.data, at, 8)
        else state.data.fill(0, at, at + length)
      }
      if (flags & 1) {
        answered.add(request)
        if (!state.error && request.type === CMD.READ) session.reads.push({ request, data: state.data })
        if (!state.error && request.type === CMD.WRITE) session.ackedWrites.push(request)
      }
    } else {
      session.violations.push(`bad reply magic 0x${magic.toString(16)}`)
      return
    }
  }
}
