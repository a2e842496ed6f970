/**
 * Unix socket paths that mean what they say. sun_path holds 107 bytes plus a NUL, and Node
 * (libuv 1.46) silently truncates a longer path: a server binds, and a client connects, at a
 * path outside the intended directory, where two long paths with a common prefix meet.
 *
 * A path that does not fit is reached through its directory instead: the directory is opened
 * (O_PATH: search permission suffices, as for bind and connect themselves) and the socket is
 * named `/proc/self/fd/N/NAME`, which the kernel resolves to the real directory. The socket file
 * therefore stays exactly where it was asked for, guarded by that directory's permissions, with
 * nothing recorded elsewhere that could go stale. (Binding after chdir() would change global
 * state; a runtime directory would need a second path recorded and cleaned up.)
 *
 * The directory must stay open while the name is in use: libuv unlinks a server's socket by the
 * name it was bound with when the server closes, so release() comes after the server's close.
 */
import { constants } from 'node:fs'
import { type FileHandle, lstat, open, stat, unlink } from 'node:fs/promises'
import { createConnection } from 'node:net'
import { basename, dirname } from 'node:path'
import { SnapError } from '../errors.js'

/** Longest path bind(2)/connect(2) take: sun_path is 108 bytes including the NUL. */
export const SUN_PATH_MAX_BYTES = 107

/** Linux's O_PATH (not exported by node:fs). */
const O_PATH = 0o10000000

export class UnixSocketAddress {
  /** The name to give listen()/createConnection(): the path itself, or one through /proc/self/fd. */
  readonly bindPath: string
  private dirHandle: FileHandle | null

  private constructor(bindPath: string, dirHandle: FileHandle | null) {
    this.bindPath = bindPath
    this.dirHandle = dirHandle
  }

  /**
   * An address for `path`. Errors are one line naming `path`: a missing directory is reported
   * as such (bind alone would say EACCES), a denied one as permission denied.
   */
  static async of(path: string): Promise<UnixSocketAddress> {
    const dir = dirname(path)
    const name = basename(path)
    if (Buffer.byteLength(path) <= SUN_PATH_MAX_BYTES) {
      await checkDirectory(dir, path)
      return new UnixSocketAddress(path, null)
    }
    let handle: FileHandle
    try {
      handle = await open(dir, constants.O_RDONLY | constants.O_DIRECTORY | O_PATH)
    } catch (err) {
      throw directoryError(err, dir, path)
    }
    const bindPath = `/proc/self/fd/${handle.fd}/${name}`
    if (Buffer.byteLength(bindPath) > SUN_PATH_MAX_BYTES) {
      await handle.close()
      throw new SnapError('SNAP_BAD_ARGUMENT', `socket name ${name} is too long (a Unix socket path holds ${SUN_PATH_MAX_BYTES} bytes)`)
    }
    return new UnixSocketAddress(bindPath, handle)
  }

  /** Closes the directory; call after the server bound at bindPath has closed. */
  async release(): Promise<void> {
    const handle = this.dirHandle
    this.dirHandle = null
    await handle?.close().catch(() => {})
  }
}

async function checkDirectory(dir: string, path: string): Promise<void> {
  const st = await stat(dir).catch((err: unknown) => {
    throw directoryError(err, dir, path)
  })
  if (!st.isDirectory()) {
    throw new SnapError('SNAP_NOT_FOUND', `cannot use socket ${path}: ${dir} is not a directory`, { details: { path } })
  }
}

function directoryError(err: unknown, dir: string, path: string): SnapError {
  const code = (err as NodeJS.ErrnoException).code
  if (code === 'ENOENT') return new SnapError('SNAP_NOT_FOUND', `cannot use socket ${path}: directory ${dir} does not exist`, { details: { path } })
  if (code === 'ENOTDIR') return new SnapError('SNAP_NOT_FOUND', `cannot use socket ${path}: ${dir} is not a directory`, { details: { path } })
  if (code === 'EACCES' || code === 'EPERM') {
    return new SnapError('SNAP_BUSY', `permission denied on ${path} (directory ${dir})`, { details: { path } })
  }
  return new SnapError('SNAP_IO', `cannot use socket ${path}: ${(err as Error).message}`, { cause: err, details: { path } })
}

export type SocketProbe = 'absent' | 'stale' | 'live'

/**
 * What is at a socket path: nothing, a socket nobody listens on (ECONNREFUSED: a server that
 * died without cleaning up), or a live listener. Anything other than a socket is refused, so a
 * mistyped path never deletes a file.
 */
export async function probeSocket(path: string): Promise<SocketProbe> {
  const st = await lstat(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return null
    throw directoryError(err, dirname(path), path)
  })
  if (!st) return 'absent'
  if (!st.isSocket()) throw new SnapError('SNAP_EXISTS', `${path} exists and is not a socket`, { details: { path } })
  const address = await UnixSocketAddress.of(path)
  try {
    return await new Promise<SocketProbe>((resolve, reject) => {
      const socket = createConnection(address.bindPath)
      socket.once('connect', () => {
        socket.destroy()
        resolve('live')
      })
      socket.once('error', (err: NodeJS.ErrnoException) => {
        if (err.code === 'ECONNREFUSED') resolve('stale')
        else if (err.code === 'ENOENT') resolve('absent')
        else if (err.code === 'EACCES' || err.code === 'EPERM') reject(new SnapError('SNAP_BUSY', `permission denied on ${path}`, { details: { path } }))
        else reject(new SnapError('SNAP_IO', `cannot probe socket ${path}: ${err.message}`, { details: { path } }))
      })
    })
  } finally {
    await address.release()
  }
}

/**
 * Makes `path` free to bind: removes a stale socket left by a server that died, refuses with
 * one line when a server still listens there. `what` names the socket in that line.
 */
export async function clearStaleSocket(path: string, what: string): Promise<void> {
  const state = await probeSocket(path)
  if (state === 'live') throw new SnapError('SNAP_BUSY', `${what} ${path} is in use: another server listens on it`, { details: { path } })
  if (state === 'stale') await unlink(path).catch(() => {})
}
