/**
 * Socket reads that land where the bytes are going (Node's `onread` mode), for accepted sockets.
 *
 * Why: in Node's default mode every read of a socket allocates a fresh 64 KiB buffer, and a
 * WRITE payload is then copied out of those buffers into its own. For 1 MiB writes that was most
 * of the server's JavaScript time (allocation, the GC of the buffers, the copy). With `onread`
 * the connection names the buffer of each read: the unfilled tail of the payload it is
 * assembling, so the kernel copies the bytes into place, or else a scratch buffer it reuses.
 *
 * Node offers `onread` only to sockets it constructs from options (net.connect, new Socket), not
 * to the ones a server accepts. So the accepted socket (created paused, pauseOnConnect) gives its
 * handle to a new Socket made with `onread`, and is then destroyed without it: the handle stays
 * open, and the server's own count of connections drops as it would on close (NbdServer counts
 * its clients itself). `_handle` is Node's private field; where it is not what we expect, the
 * accepted socket is used as it is, with 'data' events.
 */
import net from 'node:net'

/** Whoever decides where each read of a socket lands. */
export interface DirectReader {
  /** The buffer the next read fills (called once at adoption and after every read). */
  nextReadBuffer(): Uint8Array
  /** `bytes` bytes were read into the start of `buffer`, the one nextReadBuffer() last returned. */
  onRead(bytes: number, buffer: Uint8Array): void
}

interface StreamHandle {
  readStart(): number
  readStop(): number
  close(): void
}

/**
 * A socket in `onread` mode over `accepted`'s connection, or null when `accepted` cannot give
 * its handle away (then it is left untouched). `accepted` must come from a server created with
 * pauseOnConnect, and must not have been read from.
 */
export function adoptForDirectReceive(accepted: net.Socket, reader: DirectReader, options: { allowHalfOpen: boolean }): net.Socket | null {
  const internals = accepted as unknown as { _handle?: unknown }
  const handle = internals._handle
  if (!isStreamHandle(handle) || accepted.destroyed) return null
  internals._handle = null
  accepted.destroy()
  try {
    return adopt(handle, reader, options)
  } catch (err) {
    // Nobody owns the connection now: close it rather than leave the client hanging.
    handle.close()
    throw err
  }
}

function adopt(handle: StreamHandle, reader: DirectReader, options: { allowHalfOpen: boolean }): net.Socket {
  return new net.Socket({
    handle,
    allowHalfOpen: options.allowHalfOpen,
    readable: true,
    writable: true,
    onread: {
      buffer: () => reader.nextReadBuffer(),
      callback: (bytes: number, buffer: Uint8Array) => {
        reader.onRead(bytes, buffer)
      },
    },
  } as net.SocketConstructorOpts)
}

function isStreamHandle(handle: unknown): handle is StreamHandle {
  return (
    typeof handle === 'object' &&
    handle !== null &&
    typeof (handle as StreamHandle).readStart === 'function' &&
    typeof (handle as StreamHandle).readStop === 'function' &&
    typeof (handle as StreamHandle).close === 'function'
  )
}
