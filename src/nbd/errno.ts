/**
 * The single mapping from errors to NBD wire errors. Nothing else in the server decides which
 * errno a failure becomes (nbdkit's nbd_errno habit).
 */
import { isSnapError } from '../errors.js'
import { Command, NbdErrno, type NbdErrnoValue } from '../protocol/nbd/constants.js'

/** Whether the command writes, so "out of range" means "no space" (spec: ENOSPC past the end). */
function isWriteCommand(command: number): boolean {
  return command === Command.WRITE || command === Command.WRITE_ZEROES
}

export function nbdErrnoFor(err: unknown, command: number): NbdErrnoValue {
  if (isSnapError(err)) {
    switch (err.code) {
      case 'SNAP_OUT_OF_RANGE':
        return isWriteCommand(command) ? NbdErrno.ENOSPC : NbdErrno.EINVAL
      case 'SNAP_READ_ONLY':
        return NbdErrno.EPERM
      case 'SNAP_NO_SPACE':
      case 'SNAP_OVERFLOW':
        return NbdErrno.ENOSPC
      case 'SNAP_NOT_SUPPORTED':
        // ENOTSUP is reserved by the spec for FAST_ZERO; everywhere else it reads as EINVAL.
        return command === Command.WRITE_ZEROES ? NbdErrno.ENOTSUP : NbdErrno.EINVAL
      case 'SNAP_BAD_ARGUMENT':
        return NbdErrno.EINVAL
      case 'SNAP_CLOSED':
      case 'SNAP_ABORTED':
        // The export went away under us: the client must soft-disconnect, which is what
        // ESHUTDOWN tells it to do.
        return NbdErrno.ESHUTDOWN
      default:
        return NbdErrno.EIO
    }
  }
  // Foreign errors (fs errno) that slipped past asSnapError.
  switch ((err as NodeJS.ErrnoException | undefined)?.code) {
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NbdErrno.ENOSPC
    case 'EROFS':
    case 'EPERM':
    case 'EACCES':
      return NbdErrno.EPERM
    case 'EINVAL':
      return NbdErrno.EINVAL
    default:
      return NbdErrno.EIO
  }
}

/** One line for logs and error-chunk messages: no stack, no cause chain. */
export function describeError(err: unknown): string {
  if (err instanceof Error) {
    const code = (err as { code?: unknown }).code
    return `${typeof code === 'string' ? `${code}: ` : ''}${err.message}`.split('\n')[0]!
  }
  return String(err).split('\n')[0]!
}
