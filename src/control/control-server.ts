/**
 * Serves VolumeOps (plus merge control supplied by the owner) on the volume's control socket,
 * so that CLI commands run against a served volume are carried out live by the server.
 */
import { unlink } from 'node:fs/promises'
import { type Server, type Socket, createServer } from 'node:net'
import { join } from 'node:path'
import { SnapError, isSnapError } from '../errors.js'
import type { Volume } from '../volume/volume.js'
import { CONTROL_SOCKET, type ControlReply, type ControlRequest, lineSplitter } from './control-protocol.js'
import { type VolumeOps, localOps } from './volume-ops.js'

export type ExtraHandler = (args: Record<string, unknown>) => Promise<unknown>

export class ControlServer {
  private readonly server: Server
  private readonly ops: VolumeOps
  private readonly extra: Map<string, ExtraHandler>
  private readonly sockets = new Set<Socket>()
  readonly path: string

  constructor(volume: Volume, extra: Record<string, ExtraHandler> = {}) {
    this.ops = localOps(volume)
    this.extra = new Map(Object.entries(extra))
    this.path = join(volume.dir, CONTROL_SOCKET)
    this.server = createServer((socket) => this.accept(socket))
  }

  async listen(): Promise<void> {
    await unlink(this.path).catch(() => {}) // a stale socket from a crashed server
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject)
      this.server.listen(this.path, () => {
        this.server.off('error', reject)
        resolve()
      })
    })
  }

  private accept(socket: Socket): void {
    this.sockets.add(socket)
    socket.on('close', () => this.sockets.delete(socket))
    socket.on('error', () => socket.destroy())
    socket.on(
      'data',
      lineSplitter((line) => {
        void this.handle(line).then((reply) => {
          if (!socket.destroyed) socket.write(`${JSON.stringify(reply)}\n`)
        })
      }),
    )
  }

  private async handle(line: string): Promise<ControlReply> {
    let request: ControlRequest
    try {
      request = JSON.parse(line) as ControlRequest
    } catch {
      return { id: -1, ok: false, error: { code: 'SNAP_BAD_ARGUMENT', message: 'control request is not JSON' } }
    }
    try {
      return { id: request.id, ok: true, result: await this.dispatch(request.op, request.args ?? {}) }
    } catch (err) {
      const code = isSnapError(err) ? err.code : 'SNAP_IO'
      const message = err instanceof Error ? err.message : String(err)
      return { id: request.id, ok: false, error: { code, message } }
    }
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
    await unlink(this.path).catch(() => {})
  }
}
