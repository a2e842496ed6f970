/**
 * Serves VolumeOps (plus merge control supplied by the owner) on the volume's control socket,
 * so that CLI commands run against a served volume are carried out live by the server.
 */
import { lstat, unlink } from 'node:fs/promises'
import { type Server, type Socket, createServer } from 'node:net'
import { join } from 'node:path'
import { SnapError, isSnapError } from '../errors.js'
import { type UnixSocketAddress, clearStaleSocket, listenPrivate } from '../util/unix-socket.js'
import type { Volume } from '../volume/volume.js'
import {
  CONTROL_SOCKET,
  type ControlReply,
  type ControlRequest,
  HELLO,
  type VolumeIdentity,
  lineSplitter,
  sameVolume,
  volumeIdentity,
} from './control-protocol.js'
import { type DeviceUsers, type VolumeOps, localOps } from './volume-ops.js'

export type ExtraHandler = (args: Record<string, unknown>) => Promise<unknown>

export interface ControlServerOptions {
  /** Refuse the operations that change the volume (the server was started --read-only). */
  readonly readOnly?: boolean
  /** Who has the volume's devices open over NBD (remove and merge refuse open snapshots). */
  readonly users?: DeviceUsers
  /**
   * The volume is leased (on a shared store): holding the lease makes this server the owner, so
   * a socket still answering at the path belongs to a former owner (stalled, fenced) and is
   * replaced instead of refusing to start.
   */
  readonly replaceLive?: boolean
}

/** Operations that change the volume's data or its set of snapshots. */
const MUTATIONS: ReadonlySet<string> = new Set(['write', 'snapshot', 'remove', 'import', 'merge', 'import-diff'])

/** A client connection: whether its HELLO named this server's volume. */
interface Connection {
  identified: boolean
}

export class ControlServer {
  private readonly server: Server
  private readonly volume: Volume
  private readonly ops: VolumeOps
  private readonly extra: Map<string, ExtraHandler>
  private readonly readOnly: boolean
  private readonly sockets = new Set<Socket>()
  private identity: VolumeIdentity | null = null
  private address: UnixSocketAddress | null = null
  /** Inode of the socket file this server bound, so close() removes only its own. */
  private socketInode: number | null = null
  private readonly replaceLive: boolean
  readonly path: string

  constructor(volume: Volume, extra: Record<string, ExtraHandler> = {}, options: ControlServerOptions = {}) {
    this.volume = volume
    this.ops = localOps(volume, options.users)
    this.extra = new Map(Object.entries(extra))
    this.readOnly = options.readOnly === true
    this.replaceLive = options.replaceLive === true
    this.path = join(volume.dir, CONTROL_SOCKET)
    this.server = createServer((socket) => this.accept(socket))
  }

  async listen(): Promise<void> {
    this.identity = await volumeIdentity(this.volume.dir)
    // A stale socket from a crashed server goes; a live one of a former lease holder too (the
    // rename in listenPrivate replaces it).
    if (!this.replaceLive) await clearStaleSocket(this.path, 'control socket')
    // Mode 0600 from the first instant: only this user (and root) may connect. There is no
    // SO_PEERCRED in Node, so this mode is the server's gate; HELLO then checks the volume.
    const address = await listenPrivate(this.server, this.path)
    this.address = address
    this.socketInode = (await lstat(this.path).catch(() => null))?.ino ?? null
  }

  private accept(socket: Socket): void {
    this.sockets.add(socket)
    const connection: Connection = { identified: false }
    socket.on('close', () => this.sockets.delete(socket))
    socket.on('error', () => socket.destroy())
    socket.on(
      'data',
      lineSplitter((line) => {
        void this.handle(line, connection).then((reply) => {
          if (!socket.destroyed) socket.write(`${JSON.stringify(reply)}\n`)
        })
      }),
    )
  }

  private async handle(line: string, connection: Connection): Promise<ControlReply> {
    let request: ControlRequest
    try {
      request = JSON.parse(line) as ControlRequest
    } catch {
      return { id: -1, ok: false, error: { code: 'SNAP_BAD_ARGUMENT', message: 'control request is not JSON' } }
    }
    try {
      const args = request.args ?? {}
      if (request.op === HELLO) return { id: request.id, ok: true, result: this.hello(args, connection) }
      if (!connection.identified) throw new SnapError('SNAP_BAD_ARGUMENT', `control connection to ${this.path} has not named this volume`)
      if (this.readOnly && MUTATIONS.has(request.op)) {
        throw new SnapError('SNAP_READ_ONLY', `volume ${this.volume.name} is served read-only: ${request.op} refused`)
      }
      return { id: request.id, ok: true, result: await this.dispatch(request.op, args) }
    } catch (err) {
      const code = isSnapError(err) ? err.code : 'SNAP_IO'
      const message = err instanceof Error ? err.message : String(err)
      return { id: request.id, ok: false, error: { code, message } }
    }
  }

  /** Answers with the volume this server owns; the connection may go on only if the client meant it. */
  private hello(args: Record<string, unknown>, connection: Connection): VolumeIdentity {
    const identity = this.identity as VolumeIdentity
    connection.identified = sameVolume(identity, { dev: String(args.dev), ino: String(args.ino) })
    return identity
  }

  private async dispatch(op: string, a: Record<string, unknown>): Promise<unknown> {
    const snap = (a.snapshot as string | null | undefined) ?? null
    switch (op) {
      case 'list':
        return this.ops.list()
      case 'status':
        return this.ops.status(snap)
      case 'snapshot':
        return this.ops.snapshot(a.name as string, (a.options ?? {}) as never)
      case 'remove':
        return this.ops.remove(a.name as string, { force: a.force === true })
      case 'import':
        return this.ops.importCow(a.name as string, a.cow as string, a.inPlace === true)
      case 'check':
        return this.ops.check((a.name as string | null) ?? null)
      case 'size':
        return this.ops.size(snap)
      case 'read': {
        const data = await this.ops.read(snap, a.offset as number, a.length as number)
        return Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString('base64')
      }
      case 'write':
        return this.ops.write(snap, a.offset as number, Buffer.from(a.data as string, 'base64'))
      case 'flush':
        return this.ops.flush(snap)
      case 'map':
        return this.ops.map(snap)
      case 'diff':
        return this.ops.diff((a.from as string | null | undefined) ?? null, (a.to as string | null | undefined) ?? null)
      case 'import-diff':
        return this.ops.importDiff(a.path as string, { force: a.force === true })
      default: {
        const handler = this.extra.get(op)
        if (!handler) throw new SnapError('SNAP_BAD_ARGUMENT', `unknown control operation '${op}'`)
        return handler(a)
      }
    }
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy()
    await new Promise<void>((resolve) => this.server.close(() => resolve()))
    // libuv unlinked the socket by its bind path, which may go through the directory handle:
    // only now may that handle close.
    await this.address?.release()
    this.address = null
    // Only our own: a server that took the volume over since has its socket at the same path.
    const st = await lstat(this.path).catch(() => null)
    if (st !== null && st.ino === this.socketInode) await unlink(this.path).catch(() => {})
  }
}
