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
import { type FileHandle, chmod, lstat, mkdtemp, open, rename, rm, stat, unlink } from 'node:fs/promises'
import { type Server, createConnection } from 'node:net'
import { basename, dirname, join } from 'node:path'
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
   * as such (bind alone would say EACCES), a denied one as permission denied. `viaDirectory`
   * names it through the directory handle even when the path fits.
   */
  static async of(path: string, options: { viaDirectory?: boolean } = {}): Promise<UnixSocketAddress> {
    const dir = dirname(path)
    const name = basename(path)
    if (options.viaDirectory !== true && Buffer.byteLength(path) <= SUN_PATH_MAX_BYTES) {
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

/** Mode of a socket only its owner may connect to (connect(2) needs write permission). */
export const PRIVATE_SOCKET_MODE = 0o600

/**
 * Makes `server` listen at `path` with mode 0600, with no moment at which anyone else could
 * connect. bind(2) creates the socket file with the process's umask, and a connection accepted
 * before a chmod would outlive it; the umask is process-wide (changing it would race the
 * process's other file creations). So the socket is bound in a fresh 0700 directory beside
 * `path`, made 0600 there, and renamed into place: connect(2) reaches a socket by its inode,
 * which a rename keeps. It is bound through the directory's handle (/proc/self/fd/N/NAME), so
 * the name libuv unlinks when the server closes leads into that directory, by then removed,
 * whatever was planted at its old name since.
 *
 * Returns the address, to release() after the server has closed. The caller has made `path`
 * free (clearStaleSocket); a rename replaces a file planted there since, never a directory.
 */
export async function listenPrivate(server: Server, path: string): Promise<UnixSocketAddress> {
  let staging: string
  try {
    staging = await mkdtemp(join(dirname(path), `.${basename(path)}-`))
  } catch (err) {
    throw directoryError(err, dirname(path), path)
  }
  const staged = join(staging, basename(path))
  let address: UnixSocketAddress | null = null
  let listening = false
  try {
    address = await UnixSocketAddress.of(staged, { viaDirectory: true })
    const bindPath = address.bindPath
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(bindPath, () => {
        server.off('error', reject)
        resolve()
      })
    })
    listening = true
    await chmod(staged, PRIVATE_SOCKET_MODE)
    await rename(staged, path)
    return address
  } catch (err) {
    if (listening) await new Promise<void>((resolve) => server.close(() => resolve()))
    await address?.release()
    throw new SnapError('SNAP_BUSY', `cannot listen on ${path}: ${(err as Error).message}`, { cause: err, details: { path } })
  } finally {
    await rm(staging, { recursive: true, force: true }).catch(() => {})
  }
}
