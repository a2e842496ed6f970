/**
 * Client side of the control socket: VolumeOps carried out by the server that owns the volume.
 */
import type { Stats } from 'node:fs'
import { stat } from 'node:fs/promises'
import { type Socket, createConnection } from 'node:net'
import { join } from 'node:path'
import { SnapError, type SnapErrorCode, isSnapError } from '../errors.js'
import { UnixSocketAddress } from '../util/unix-socket.js'
import type { VolumeInfo } from '../volume/volume.js'
import type { AllocationExtent } from '../volume/block-maps.js'
import type { DiffResult } from '../backup/diff.js'
import type { ImportOptions, ImportSummary } from '../backup/import-diff.js'
import { CONTROL_SOCKET, type ControlReply, HELLO, type VolumeIdentity, lineSplitter, sameVolume, volumeIdentity } from './control-protocol.js'
import { IO_PIECE_BYTES, type RemoveOptions, type VolumeOps } from './volume-ops.js'

/**
 * The socket at `path` if it may be trusted with commands and data for the volume in `dir`:
 * it must belong to the directory's owner, to root or to this user. Anyone else's socket was
 * planted there (Node cannot ask the server's credentials, SO_PEERCRED, after connecting), and
 * is refused with one line. Null when no socket is there: the volume is not served.
 */
async function trustedSocket(dir: string, path: string): Promise<Stats | null> {
  const denied = () =>
    new SnapError('SNAP_BUSY', `permission denied on ${path}: this user may not use the server of volume ${dir}`, { details: { path } })
  const [dirStats, socketStats] = await Promise.all([
    stat(dir),
    stat(path).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'EACCES' || err.code === 'EPERM') throw denied()
      return null // ENOENT, ENOTDIR, ELOOP: nothing usable is there
    }),
  ])
  if (!socketStats?.isSocket()) return null
  const owner = socketStats.uid
  if (owner !== dirStats.uid && owner !== 0 && owner !== process.getuid?.()) {
    throw new SnapError(
      'SNAP_BUSY',
      `${path} belongs to uid ${owner}, not to the volume's owner (uid ${dirStats.uid}) or root; refusing to send it a command for ${dir}`,
      { details: { path } },
    )
  }
  return socketStats
}

export class ControlClient implements VolumeOps {
  private readonly socket: Socket
  private nextId = 1
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: unknown) => void }>()
  private readonly events = new Map<string, (payload: unknown) => void>()

  private constructor(socket: Socket) {
    this.socket = socket
    socket.on(
      'data',
      lineSplitter((line) => {
        const reply = JSON.parse(line) as ControlReply
        const w = this.waiting.get(reply.id)
        if (!w) return
        this.waiting.delete(reply.id)
        if (reply.ok) w.resolve(reply.result)
        else w.reject(new SnapError(reply.error.code as SnapErrorCode, reply.error.message))
      }),
    )
    const failAll = () => {
      for (const w of this.waiting.values()) w.reject(new SnapError('SNAP_IO', 'the server closed the control connection'))
      this.waiting.clear()
    }
    socket.on('close', failAll)
    socket.on('error', failAll)
  }

  /**
   * Connects to the server owning `dir` and confirms that it owns exactly that volume; null when
   * nothing listens there (the caller opens the volume itself). A socket this user may not
   * reach, or one served for another volume, is refused with one line.
   */
  static async connect(dir: string): Promise<ControlClient | null> {
    const path = join(dir, CONTROL_SOCKET)
    let address: UnixSocketAddress
    try {
      address = await UnixSocketAddress.of(path)
    } catch (err) {
      if (isSnapError(err, 'SNAP_NOT_FOUND')) return null // no such directory: opening the volume says so
      throw err
    }
    const checked = await trustedSocket(dir, path).catch(async (err: unknown) => {
      await address.release()
      throw err
    })
    if (!checked) {
      await address.release()
      return null
    }
    let socket: Socket | null
    try {
      socket = await new Promise<Socket | null>((resolve, reject) => {
        const s = createConnection(address.bindPath)
        s.once('connect', () => resolve(s))
        s.once('error', (err: NodeJS.ErrnoException) => {
          if (err.code === 'EACCES' || err.code === 'EPERM') {
            reject(new SnapError('SNAP_BUSY', `permission denied on ${path}: this user may not use the server of volume ${dir}`, { details: { path } }))
          } else resolve(null) // ENOENT: not served; ECONNREFUSED: a dead server's stale socket
        })
      })
    } finally {
      await address.release()
    }
    if (!socket) return null
    const client = new ControlClient(socket)
    try {
      // The file connected to is the one checked, unless it was swapped in between (which only
      // someone who may write the volume directory can do).
      const now = await stat(path).catch(() => null)
      if (!now || now.dev !== checked.dev || now.ino !== checked.ino) {
        throw new SnapError('SNAP_BUSY', `${path} was replaced while connecting; refusing to send it a command for ${dir}`, { details: { path } })
      }
      await client.confirm(dir, path)
    } catch (err) {
      client.close()
      throw err
    }
    return client
  }

  /** HELLO: the server must own the very directory `dir` names. */
  private async confirm(dir: string, path: string): Promise<void> {
    const wanted = await volumeIdentity(dir)
    const served = await this.call<VolumeIdentity>(HELLO, { dev: wanted.dev, ino: wanted.ino })
    if (!served || typeof served !== 'object' || !sameVolume(served, wanted)) {
      const other = served && typeof served.dir === 'string' ? ` (it serves ${served.dir})` : ''
      throw new SnapError('SNAP_BUSY', `${path} is the control socket of another volume${other}; refusing to send it a command for ${dir}`, {
        details: { path },
      })
    }
  }

  call<T>(op: string, args: Record<string, unknown> = {}): Promise<T> {
    const id = this.nextId++
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject })
      this.socket.write(`${JSON.stringify({ id, op, args })}\n`)
    })
  }

  on(event: string, handler: (payload: unknown) => void): void {
    this.events.set(event, handler)
  }

  list(): Promise<VolumeInfo> {
    return this.call('list')
  }
  status(snapshot: string | null): Promise<string> {
    return this.call('status', { snapshot })
  }
  snapshot(name: string, options: object): Promise<void> {
    return this.call('snapshot', { name, options })
  }
  remove(name: string, options: RemoveOptions = {}): Promise<void> {
    return this.call('remove', { name, force: options.force === true })
  }
  importCow(name: string, cow: string, inPlace: boolean): Promise<void> {
    return this.call('import', { name, cow, inPlace })
  }
  check(name: string | null): Promise<{ clean: boolean; problems: string[] }> {
    return this.call('check', { name })
  }
  size(snapshot: string | null): Promise<number> {
    return this.call('size', { snapshot })
  }
  async read(snapshot: string | null, offset: number, length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length)
    for (let done = 0; done < length; done += IO_PIECE_BYTES) {
      const n = Math.min(IO_PIECE_BYTES, length - done)
      const b64 = await this.call<string>('read', { snapshot, offset: offset + done, length: n })
      out.set(Buffer.from(b64, 'base64'), done)
    }
    return out
  }
  async write(snapshot: string | null, offset: number, data: Uint8Array): Promise<void> {
    // Checked up front: a write sent in pieces must not land partly and then fail.
    const size = await this.size(snapshot)
    if (offset + data.length > size) {
      throw new SnapError('SNAP_OUT_OF_RANGE', `range ${offset}+${data.length} is beyond the end of the volume (${size} bytes)`)
    }
    for (let done = 0; done < data.length || done === 0; done += IO_PIECE_BYTES) {
      const piece = data.subarray(done, done + IO_PIECE_BYTES)
      await this.call('write', { snapshot, offset: offset + done, data: Buffer.from(piece).toString('base64') })
      if (data.length === 0) break
    }
  }
  flush(snapshot: string | null): Promise<void> {
    return this.call('flush', { snapshot })
  }
  map(snapshot: string | null): Promise<AllocationExtent[]> {
    return this.call('map', { snapshot })
  }
  diff(from: string | null, to: string | null): Promise<DiffResult> {
    return this.call('diff', { from, to })
  }
  importDiff(stagedPath: string, options: ImportOptions): Promise<ImportSummary> {
    return this.call('import-diff', { path: stagedPath, force: options.force === true })
  }

  close(): void {
    this.socket.end()
  }
}
