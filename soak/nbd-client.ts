/**
 * A small multiplexing NBD client for the soak: fixed newstyle handshake, OPT_GO, simple
 * replies, any number of requests in flight matched to their replies by cookie. Written from
 * the protocol document, sharing no code with src/nbd, so the soak checks the server against an
 * independent reading of the wire format.
 */
import net from 'node:net'

const OPTS_MAGIC = 0x49484156454f5054n // "IHAVEOPT"
const REPLY_MAGIC_HIGH = 0x0003e889
const REPLY_MAGIC_LOW = 0x045565a9
const REQUEST_MAGIC = 0x25609513
const SIMPLE_REPLY_MAGIC = 0x67446698
const OPT_GO = 7
const REP_ACK = 1
const REP_INFO = 3
const INFO_EXPORT = 0

export const Cmd = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, WRITE_ZEROES: 6 } as const
export type CmdName = keyof typeof Cmd
export const FLAG_FUA = 1
export const FLAG_NO_HOLE = 2
export const ESHUTDOWN = 108

export const TransmissionFlags = { READ_ONLY: 0x2, SEND_FLUSH: 0x4, SEND_FUA: 0x8, SEND_TRIM: 0x20, SEND_WRITE_ZEROES: 0x40, CAN_MULTI_CONN: 0x100 }

export interface NbdReply {
  /** NBD errno; 0 on success. */
  readonly error: number
  /** Read data (empty unless a successful READ). */
  readonly data: Buffer
}

interface Pending {
  readonly readLength: number
  resolve(reply: NbdReply): void
  reject(err: Error): void
}

/** A byte queue that only copies what a caller takes (replies of many MiB arrive in pieces). */
class Incoming {
  private chunks: Buffer[] = []
  length = 0

  push(chunk: Buffer): void {
    this.chunks.push(chunk)
    this.length += chunk.length
  }

  /** The first n bytes (n <= length), left in the queue. */
  peek(n: number): Buffer {
    const first = this.chunks[0] as Buffer
    if (first.length >= n) return first.subarray(0, n)
    const out = Buffer.allocUnsafe(n)
    let filled = 0
    for (const c of this.chunks) {
      if (filled === n) break
      const k = Math.min(c.length, n - filled)
      c.copy(out, filled, 0, k)
      filled += k
    }
    return out
  }

  take(n: number): Buffer {
    const first = this.chunks[0]
    if (first && first.length >= n) {
      const out = first.subarray(0, n)
      if (first.length === n) this.chunks.shift()
      else this.chunks[0] = first.subarray(n)
      this.length -= n
      return out
    }
    const out = Buffer.allocUnsafe(n)
    let filled = 0
    while (filled < n) {
      const c = this.chunks[0] as Buffer
      const k = Math.min(c.length, n - filled)
      c.copy(out, filled, 0, k)
      filled += k
      if (k === c.length) this.chunks.shift()
      else this.chunks[0] = c.subarray(k)
    }
    this.length -= n
    return out
  }
}

export class NbdClient {
  readonly exportName: string
  sizeBytes = 0
  transmissionFlags = 0
  private readonly socket: net.Socket
  private readonly incoming = new Incoming()
  private readonly pending = new Map<bigint, Pending>()
  private nextCookie = 1n
  private handshakeWaiter: (() => void) | null = null
  private inTransmission = false
  private failure: Error | null = null
  /** Resolves when the socket has closed. */
  readonly closed: Promise<void>

  private constructor(socket: net.Socket, exportName: string) {
    this.socket = socket
    this.exportName = exportName
    socket.setNoDelay(true)
    socket.on('data', (chunk: Buffer) => {
      this.incoming.push(chunk)
      if (this.inTransmission) this.parseReplies()
      else this.handshakeWaiter?.()
    })
    this.closed = new Promise((resolve) => {
      socket.on('close', () => {
        this.fail(new Error(`${exportName}: connection closed`))
        resolve()
      })
    })
    socket.on('error', (err) => this.fail(err))
  }

  private fail(err: Error): void {
    if (this.failure === null) this.failure = err
    this.handshakeWaiter?.()
    for (const p of this.pending.values()) p.reject(this.failure)
    this.pending.clear()
  }

  /** Connects and negotiates `exportName` with OPT_GO; rejects if the server refuses it. */
  static async open(port: number, exportName: string): Promise<NbdClient> {
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect(port, '127.0.0.1')
      s.once('connect', () => resolve(s))
      s.once('error', reject)
    })
    const client = new NbdClient(socket, exportName)
    try {
      await client.handshake()
    } catch (err) {
      socket.destroy()
      throw err
    }
    return client
  }

  private async read(n: number): Promise<Buffer> {
    while (this.incoming.length < n) {
      if (this.failure) throw this.failure
      await new Promise<void>((resolve) => {
        this.handshakeWaiter = resolve
      })
      this.handshakeWaiter = null
    }
    return this.incoming.take(n)
  }

  private async handshake(): Promise<void> {
    const greeting = await this.read(18)
    if (greeting.subarray(0, 16).toString('latin1') !== 'NBDMAGICIHAVEOPT') throw new Error('not a newstyle NBD server')
    const clientFlags = Buffer.alloc(4)
    clientFlags.writeUInt32BE(greeting.readUInt16BE(16) & 3) // FIXED_NEWSTYLE, NO_ZEROES as offered
    const name = Buffer.from(this.exportName, 'utf8')
    const data = Buffer.alloc(4 + name.length + 2)
    data.writeUInt32BE(name.length, 0)
    name.copy(data, 4)
    data.writeUInt16BE(0, 4 + name.length)
    const option = Buffer.alloc(16)
    option.writeBigUInt64BE(OPTS_MAGIC, 0)
    option.writeUInt32BE(OPT_GO, 8)
    option.writeUInt32BE(data.length, 12)
    this.socket.write(Buffer.concat([clientFlags, option, data]))
    for (;;) {
      const header = await this.read(20)
      if (header.readUInt32BE(0) !== REPLY_MAGIC_HIGH || header.readUInt32BE(4) !== REPLY_MAGIC_LOW) throw new Error('bad option reply magic')
      const type = header.readUInt32BE(12)
      const body = await this.read(header.readUInt32BE(16))
      if (type === REP_ACK) break
      if (type >= 0x80000000) throw new Error(`export ${this.exportName} refused (0x${type.toString(16)}): ${body.toString('utf8')}`)
      if (type === REP_INFO && body.readUInt16BE(0) === INFO_EXPORT) {
        this.sizeBytes = Number(body.readBigUInt64BE(2))
        this.transmissionFlags = body.readUInt16BE(10)
      }
    }
    this.inTransmission = true
    this.parseReplies()
  }

  private parseReplies(): void {
    for (;;) {
      if (this.incoming.length < 16) return
      // The header stays queued until the whole reply (with read data) is here.
      const header = this.incoming.peek(16)
      const magic = header.readUInt32BE(0)
      const error = header.readUInt32BE(4)
      const cookie = header.readBigUInt64BE(8)
      const p = this.pending.get(cookie)
      if (magic !== SIMPLE_REPLY_MAGIC || !p) {
        this.fail(new Error(`${this.exportName}: bad reply (magic 0x${magic.toString(16)}, cookie ${cookie})`))
        this.socket.destroy()
        return
      }
      const dataLength = error === 0 ? p.readLength : 0
      if (this.incoming.length < 16 + dataLength) return
      this.incoming.take(16)
      this.pending.delete(cookie)
      p.resolve({ error, data: dataLength > 0 ? Buffer.from(this.incoming.take(dataLength)) : Buffer.alloc(0) })
    }
  }

  /** Sends one request; resolves with its reply (errors are in the reply, not thrown). */
  request(type: number, offset: number, length: number, options: { flags?: number; payload?: Uint8Array } = {}): Promise<NbdReply> {
    if (this.failure) return Promise.reject(this.failure)
    const cookie = this.nextCookie++
    const header = Buffer.alloc(28)
    header.writeUInt32BE(REQUEST_MAGIC, 0)
    header.writeUInt16BE(options.flags ?? 0, 4)
    header.writeUInt16BE(type, 6)
    header.writeBigUInt64BE(cookie, 8)
    header.writeBigUInt64BE(BigInt(offset), 16)
    header.writeUInt32BE(length, 24)
    const promise = new Promise<NbdReply>((resolve, reject) => {
      this.pending.set(cookie, { readLength: type === Cmd.READ ? length : 0, resolve, reject })
    })
    this.socket.write(header)
    if (options.payload) this.socket.write(options.payload)
    return promise
  }

  /** NBD_CMD_DISC, then waits for the server to close the socket. */
  async disconnect(): Promise<void> {
    if (!this.failure) {
      const header = Buffer.alloc(28)
      header.writeUInt32BE(REQUEST_MAGIC, 0)
      header.writeUInt16BE(Cmd.DISC, 6)
      this.socket.write(header)
      this.socket.end()
    }
    await this.closed
  }

  destroy(): void {
    this.socket.destroy()
  }
}
