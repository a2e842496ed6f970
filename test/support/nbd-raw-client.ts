/**
 * A raw-socket NBD client for wire-level tests: it can send what libnbd refuses to (bad magic,
 * unknown client flags, truncated options, oversized frames) and shows every reply byte. It
 * decodes with its own code, independent of src/protocol/nbd.
 */
import net from 'node:net'
import tls from 'node:tls'
import { infoRequestBytes, metaContextBytes, optionBytes, requestBytes } from './nbd-bytes.js'

export interface OptionReply {
  readonly option: number
  readonly type: number
  readonly data: Buffer
}

export interface ReplyChunk {
  readonly structured: boolean
  readonly flags: number
  readonly type: number
  readonly error: number
  readonly cookie: bigint
  readonly data: Buffer
}

export type RawAddress = { port: number; host?: string } | { path: string }

export class RawNbdClient {
  readonly socket: net.Socket
  private buffered = Buffer.alloc(0)
  private waiter: (() => void) | null = null
  private ended = false
  /** Resolves when the server closes the connection. */
  readonly closed: Promise<void>

  private constructor(socket: net.Socket) {
    this.socket = socket
    socket.setNoDelay(true)
    socket.on('data', (chunk: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, chunk])
      this.wake()
    })
    this.closed = new Promise((resolve) => {
      socket.on('close', () => {
        this.ended = true
        this.wake()
        resolve()
      })
    })
    socket.on('error', () => {})
  }

  /** Continues on another socket, e.g. the TLS socket after STARTTLS. */
  static wrap(socket: net.Socket): RawNbdClient {
    return new RawNbdClient(socket)
  }

  /**
   * STARTTLS (option 5), then a TLS 1.2 PSK handshake as `identity` on the same socket; returns
   * the client that speaks through TLS. Throws unless the server answers STARTTLS with ACK (1).
   */
  async startTlsPsk(key: Buffer, identity = 'alice'): Promise<RawNbdClient> {
    this.option(5)
    const reply = (await this.optionReplies())[0]
    if (reply?.type !== 1) throw new Error(`STARTTLS answered ${reply?.type}, not ACK`)
    this.socket.removeAllListeners('data')
    const secure = tls.connect({
      socket: this.socket,
      pskCallback: () => ({ psk: key, identity }),
      ciphers: 'PSK-AES128-GCM-SHA256',
      maxVersion: 'TLSv1.2',
      checkServerIdentity: () => undefined,
    })
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve)
      secure.once('error', reject)
    })
    return RawNbdClient.wrap(secure)
  }

  static connect(address: RawAddress): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const socket = 'path' in address ? net.connect(address.path) : net.connect(address.port, address.host ?? '127.0.0.1')
      socket.once('connect', () => resolve(new RawNbdClient(socket)))
      socket.once('error', reject)
    })
  }

  private wake(): void {
    const waiter = this.waiter
    this.waiter = null
    waiter?.()
  }

  /** Exactly n bytes; rejects if the server closes first. */
  async read(n: number): Promise<Buffer> {
    while (this.buffered.length < n) {
      if (this.ended) throw new Error(`server closed the connection (wanted ${n} bytes, had ${this.buffered.length})`)
      await new Promise<void>((resolve) => {
        this.waiter = resolve
      })
    }
    const out = this.buffered.subarray(0, n)
    this.buffered = this.buffered.subarray(n)
    return out
  }

  write(data: Uint8Array): void {
    this.socket.write(data)
  }

  end(): void {
    this.socket.end()
  }

  destroy(): void {
    this.socket.destroy()
  }

  /** Reads the greeting and sends client flags; returns the greeting. */
  async handshake(clientFlags = 3): Promise<Buffer> {
    const greeting = await this.read(18)
    const flags = Buffer.alloc(4)
    flags.writeUInt32BE(clientFlags)
    this.write(flags)
    return greeting
  }

  option(code: number, data?: Uint8Array): void {
    this.write(optionBytes(code, data))
  }

  async optionReply(): Promise<OptionReply> {
    const header = await this.read(20)
    if (header.readUInt32BE(0) !== 0x0003e889 || header.readUInt32BE(4) !== 0x045565a9) {
      throw new Error(`bad option reply magic: ${header.toString('hex')}`)
    }
    const length = header.readUInt32BE(16)
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data: Buffer.from(await this.read(length)) }
  }

  /** Reads replies until ACK or an error (the final reply). */
  async optionReplies(): Promise<OptionReply[]> {
    const replies: OptionReply[] = []
    for (;;) {
      const reply = await this.optionReply()
      replies.push(reply)
      if (reply.type === 1 || reply.type >= 0x80000000) return replies
    }
  }

  /** STRUCTURED_REPLY (optional), SET_META_CONTEXT (optional), then GO. Throws unless GO is acked. */
  async go(name: string, options: { structured?: boolean; contexts?: string[] } = {}): Promise<OptionReply[]> {
    if (options.structured !== false) {
      this.option(8)
      await this.optionReplies()
    }
    if (options.contexts) {
      this.option(10, metaContextBytes(name, options.contexts))
      await this.optionReplies()
    }
    this.option(7, infoRequestBytes(name, [3]))
    const replies = await this.optionReplies()
    const last = replies[replies.length - 1]!
    if (last.type !== 1) throw new Error(`GO failed: 0x${last.type.toString(16)} ${last.data.toString()}`)
    return replies
  }

  request(fields: Parameters<typeof requestBytes>[0], payload?: Uint8Array): void {
    this.write(requestBytes(fields, payload))
  }

  /** One reply unit: a simple reply (with `dataLength` bytes if error is 0) or one structured chunk. */
  async reply(dataLength = 0): Promise<ReplyChunk> {
    const magic = (await this.read(4)).readUInt32BE(0)
    if (magic === 0x67446698) {
      const rest = await this.read(12)
      const error = rest.readUInt32BE(0)
      const cookie = rest.readBigUInt64BE(4)
      const data = error === 0 && dataLength > 0 ? Buffer.from(await this.read(dataLength)) : Buffer.alloc(0)
      return { structured: false, flags: 1, type: 0, error, cookie, data }
    }
    if (magic === 0x668e33ef) {
      const rest = await this.read(16)
      const flags = rest.readUInt16BE(0)
      const type = rest.readUInt16BE(2)
      const cookie = rest.readBigUInt64BE(4)
      const data = Buffer.from(await this.read(rest.readUInt32BE(12)))
      const error = type & 0x8000 ? data.readUInt32BE(0) : 0
      return { structured: true, flags, type, error, cookie, data }
    }
    throw new Error(`bad reply magic 0x${magic.toString(16)}`)
  }

  /** Structured chunks until one carries DONE. */
  async structuredReply(): Promise<ReplyChunk[]> {
    const chunks: ReplyChunk[] = []
    for (;;) {
      const chunk = await this.reply()
      chunks.push(chunk)
      if (chunk.flags & 1) return chunks
    }
  }
}
