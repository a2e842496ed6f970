/**
 * NbdServer: accepts TCP or Unix-socket clients and runs one NbdConnection per socket.
 *
 * Design notes:
 * - The server owns no exports: an ExportProvider is asked at every handshake, so the CLI can
 *   add and remove exports while clients come and go.
 * - close() is graceful: stop accepting, let in-flight requests finish and be answered, end
 *   every socket, then flush each device that was served, so acknowledged writes are durable
 *   when close() resolves. Connections that do not go away within `closeTimeoutMs` are
 *   destroyed.
 * - Each connection is isolated: its failures close only its own socket.
 * - Resources are bounded for all clients together, not only per client: at most
 *   `maxConnections` clients (more are closed before the greeting, with a log line), and at most
 *   `maxPendingBytes` (plus one request) held by unanswered requests across them (PendingBytes).
 *   The WRITE payload buffer pool is shared and let go of when the last client leaves, so memory
 *   returns to its idle level.
 */
import net from 'node:net'
import { badArgument } from '../errors.js'
import { type Clock, systemClock } from '../util/clock.js'
import { DEFAULT_CONNECTION_LIMITS, NbdConnection, type ConnectionLimits } from './connection.js'
import { describeError } from './errno.js'
import type { ExportProvider, NbdExport } from './export.js'
import { silentLogger, type NbdLogger } from './logger.js'
import type { NbdFaultListener } from './client-fault.js'
import { PendingBytes } from './pending-bytes.js'
import type { NbdRequestObserver } from './request-observer.js'
import { PayloadPool } from './payload-pool.js'
import { createTlsContext, loadTlsFiles, type NbdTlsFiles, type NbdTlsOptions, type TlsContext } from './tls.js'

export interface NbdServerOptions {
  readonly exports: ExportProvider
  /**
   * TLS material, in memory (NbdTlsOptions) or as file paths (NbdTlsFiles: psk file,
   * certificate/key files or an nbdkit-style certificates directory; read by the first listen()).
   */
  readonly tls?: NbdTlsOptions | NbdTlsFiles
  /**
   * Simultaneous clients; more are refused by closing their socket before the handshake.
   * Default DEFAULT_MAX_CONNECTIONS.
   */
  readonly maxConnections?: number
  /**
   * Bytes that unanswered requests may hold across all clients (WRITE payloads from their
   * header on, READ buffers) before the server stops reading requests; one request may go over.
   * Default DEFAULT_MAX_PENDING_BYTES.
   */
  readonly maxPendingBytes?: number
  readonly logger?: NbdLogger
  /** Per-connection back-pressure limits. */
  readonly limits?: Partial<ConnectionLimits>
  /** How long close() waits for clients before destroying their sockets. Default 10 s. */
  readonly closeTimeoutMs?: number
  /** How long a client may take from connecting to entering transmission (0: no limit). Default 10 s, as qemu-nbd. */
  readonly handshakeTimeoutMs?: number
  /** Times the handshake limit (and requests, for the observer); the system clock by default. */
  readonly clock?: Clock
  /** Told about every answered request, with its export, op and duration (metrics). */
  readonly requestObserver?: NbdRequestObserver
  /** Told about client errors (protocol violations, failed requests, TLS refusals, …). */
  readonly onClientFault?: NbdFaultListener
  /**
   * Bytes of each socket read that has no WRITE payload to land in (plain sockets; TLS reads
   * through its own layer). Default 64 KiB, as Node's own reads; tests make it small so that
   * frames straddle many reads.
   */
  readonly readBufferBytes?: number
}

/**
 * qemu-nbd serves one client unless told otherwise (--shared), nbdkit any number. 16 leaves room
 * for multi-connection clients (nbdcopy opens 4, qemu's multi-conn up to 16) and a few tools at
 * once, while a local user cannot open sockets until the process runs out of descriptors.
 */
export const DEFAULT_MAX_CONNECTIONS = 16

/** Eight maximum-size (32 MiB) requests: a deep enough queue for full speed, and a known bound. */
export const DEFAULT_MAX_PENDING_BYTES = 256 * 1024 * 1024

/** Bytes of a socket read that has no WRITE payload to land in, as Node's own reads. */
export const DEFAULT_READ_BUFFER_BYTES = 64 * 1024

/**
 * A TCP address, a Unix socket path, or a socket already bound and listening that the process
 * was handed (systemd socket activation); `name` says which one in the log.
 */
export type NbdListenOptions =
  | { readonly host?: string; readonly port: number }
  | { readonly path: string }
  | { readonly fd: number; readonly name: string }

export type NbdAddress =
  | { readonly kind: 'tcp'; readonly host: string; readonly port: number }
  | { readonly kind: 'unix'; readonly path: string }

export class NbdServer {
  private readonly exports: ExportProvider
  private tls: TlsContext | null = null
  /** File-based TLS settings not read yet (reading is async, the constructor is not). */
  private tlsFiles: NbdTlsFiles | null = null
  private readonly maxConnections: number
  private readonly pending: PendingBytes
  private readonly payloads = new PayloadPool()
  private readonly log: NbdLogger
  private readonly limits: ConnectionLimits
  private readonly closeTimeoutMs: number
  private readonly handshakeTimeoutMs: number
  private readonly clock: Clock
  private readonly requestObserver: NbdRequestObserver | null
  private readonly onClientFault: NbdFaultListener | null
  private readonly readBufferBytes: number
  private readonly servers: net.Server[] = []
  private readonly connections = new Set<NbdConnection>()
  /** Exports a client entered transmission with, flushed on close. */
  private readonly served = new Set<NbdExport>()
  private nextId = 1
  private closing: Promise<void> | null = null

  constructor(options: NbdServerOptions) {
    this.exports = options.exports
    if (options.tls !== undefined && isTlsFiles(options.tls)) this.tlsFiles = options.tls
    // In-memory material is validated here, so a bad configuration fails at construction.
    else this.tls = createTlsContext(options.tls)
    this.maxConnections = options.maxConnections ?? DEFAULT_MAX_CONNECTIONS
    if (!(this.maxConnections >= 1)) throw badArgument(`maxConnections ${this.maxConnections} must be at least 1`)
    this.pending = new PendingBytes(options.maxPendingBytes ?? DEFAULT_MAX_PENDING_BYTES)
    this.log = options.logger ?? silentLogger
    this.limits = { ...DEFAULT_CONNECTION_LIMITS, ...options.limits }
    this.closeTimeoutMs = options.closeTimeoutMs ?? 10_000
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000
    this.clock = options.clock ?? systemClock
    this.requestObserver = options.requestObserver ?? null
    this.readBufferBytes = options.readBufferBytes ?? DEFAULT_READ_BUFFER_BYTES
    if (!Number.isSafeInteger(this.readBufferBytes) || this.readBufferBytes < 1) {
      throw badArgument(`read buffer of ${this.readBufferBytes} bytes`)
    }
    this.onClientFault = options.onClientFault ?? null
  }

  /** Number of clients currently connected. */
  get connectionCount(): number {
    return this.connections.size
  }

  /** Bytes held by unanswered requests now, the most ever held at once, and the cap. */
  get pendingBytes(): { readonly bytes: number; readonly peakBytes: number; readonly capBytes: number } {
    return { bytes: this.pending.bytes, peakBytes: this.pending.peakBytes, capBytes: this.pending.capBytes }
  }

  /** Bytes in free WRITE payload buffers kept for reuse. */
  get pooledBytes(): number {
    return this.payloads.freeBytes
  }

  /** Clients in transmission with export `name` that has not gone away. */
  clientsOf(name: string): number {
    let n = 0
    for (const connection of this.connections) {
      const exp = connection.servedExport
      if (exp !== null && exp.name === name && (exp.withdrawn?.() ?? null) === null) n++
    }
    return n
  }

  /**
   * Starts listening; may be called more than once (e.g. TCP and a Unix socket). Port 0 picks
   * an ephemeral port, reported in the result.
   */
  async listen(options: NbdListenOptions): Promise<NbdAddress> {
    if (this.closing) throw badArgument('server is closed')
    if (this.tlsFiles !== null) {
      this.tls = createTlsContext(await loadTlsFiles(this.tlsFiles))
      this.tlsFiles = null
    }
    // Plain sockets are accepted paused, so a connection can adopt them for direct receive
    // (direct-receive.ts) before anything is read; TLS reads through its own layer.
    const directReceive = this.tls === null
    const server = net.createServer({ noDelay: true, allowHalfOpen: true, pauseOnConnect: directReceive }, (socket) =>
      this.accept(socket, directReceive),
    )
    server.on('error', (err) => this.log.error(`nbd server: ${describeError(err)}`))
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error) => reject(err)
      server.once('error', onError)
      const done = () => {
        server.off('error', onError)
        resolve()
      }
      if ('path' in options) server.listen(options.path, done)
      else if ('fd' in options) server.listen({ fd: options.fd }, done)
      else server.listen(options.port, options.host ?? '127.0.0.1', done)
    })
    this.servers.push(server)
    const address = server.address()
    const bound: NbdAddress =
      typeof address === 'string' || address === null
        ? { kind: 'unix', path: 'path' in options ? options.path : 'fd' in options ? `${options.name} (fd ${options.fd})` : String(address) }
        : { kind: 'tcp', host: address.address, port: address.port }
    this.log.info(`nbd server listening on ${bound.kind === 'unix' ? bound.path : `${bound.host}:${bound.port}`}`)
    if (bound.kind === 'tcp' && !isLoopback(bound.host) && this.tls?.mode !== 'require') {
      // The default address is loopback for this reason; leaving it is allowed, not silently.
      this.log.warn(
        `nbd server: ${bound.host}:${bound.port} is reachable from other machines and TLS is not required: ` +
          'anyone who can connect reads and writes every export',
      )
    }
    if (this.servers.length === 1 && this.tls !== null) {
      // Said once, loudly when it includes clients nobody authenticated.
      const { who, anonymous } = this.tls.admits
      if (anonymous) this.log.warn(`nbd server: TLS ${this.tls.mode}: clients are not authenticated; admitting ${who}`)
      else this.log.info(`nbd server: TLS ${this.tls.mode}: admitting ${who}`)
    }
    return bound
  }

  private accept(socket: net.Socket, directReceive: boolean): void {
    socket.setNoDelay(true)
    if (this.closing) {
      socket.destroy()
      return
    }
    if (this.connections.size >= this.maxConnections) {
      this.log.warn(`nbd server: refusing ${socket.remoteAddress ?? 'unix'} client: ${this.maxConnections} connections already (the limit)`)
      this.onClientFault?.({
        kind: 'connection-limit',
        client: socket.remoteAddress ?? 'unix',
        export: null,
        message: `${this.maxConnections} connections already (the limit)`,
      })
      socket.destroy()
      return
    }
    const connection = new NbdConnection(socket, {
      id: this.nextId++,
      exports: this.exports,
      tls: this.tls,
      logger: this.log,
      limits: this.limits,
      onExportServed: (exp) => this.served.add(exp),
      handshakeTimeoutMs: this.handshakeTimeoutMs,
      pending: this.pending,
      payloads: this.payloads,
      clock: this.clock,
      requestObserver: this.requestObserver,
      directReceive,
      readBufferBytes: this.readBufferBytes,
      ...(this.onClientFault === null ? {} : { onFault: this.onClientFault }),
    })
    this.connections.add(connection)
    void connection.closed.then(() => {
      this.connections.delete(connection)
      // Idle: the pooled buffers would only keep the process at its peak size.
      if (this.connections.size === 0) this.payloads.trim()
    })
    connection.start()
  }

  /** Idempotent. Resolves when every listener and client is closed and served exports are flushed. */
  close(): Promise<void> {
    if (!this.closing) this.closing = this.doClose()
    return this.closing
  }

  private async doClose(): Promise<void> {
    const listenersClosed = Promise.all(
      this.servers.map((server) => new Promise<void>((resolve) => server.close(() => resolve()))),
    )
    for (const connection of this.connections) connection.shutdown()
    const all = Promise.all([...this.connections].map((c) => c.closed))
    let timer: NodeJS.Timeout | undefined
    const timedOut = await Promise.race([
      all.then(() => false),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), this.closeTimeoutMs)
      }),
    ])
    clearTimeout(timer)
    if (timedOut) {
      this.log.warn(`nbd server: ${this.connections.size} client(s) did not close in ${this.closeTimeoutMs} ms; dropping them`)
      for (const connection of this.connections) connection.destroy()
      // Destroyed sockets close within a tick or two; never let close() hang on one that does not.
      await Promise.race([all, new Promise((resolve) => setTimeout(resolve, 1000).unref())])
    }
    await listenersClosed
    // Devices may be shared by several exports; flush each once.
    const devices = new Set([...this.served].map((exp) => exp.device))
    for (const device of devices) {
      if (device.closed) continue
      try {
        await device.flush()
      } catch (err) {
        this.log.error(`nbd server: flush on close failed: ${describeError(err)}`)
      }
    }
    this.log.info('nbd server closed')
  }
}

/** 127.0.0.0/8 and ::1 (also IPv4-mapped): only this machine can connect there. */
function isLoopback(host: string): boolean {
  const v4 = host.startsWith('::ffff:') ? host.slice(7) : host
  return v4.startsWith('127.') || host === '::1'
}

function isTlsFiles(tls: NbdTlsOptions | NbdTlsFiles): tls is NbdTlsFiles {
  return 'pskFile' in tls || 'certFile' in tls || 'keyFile' in tls || 'caFile' in tls || 'certificatesDir' in tls
}
