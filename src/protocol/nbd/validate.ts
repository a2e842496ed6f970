/**
 * Request validation: the wire-side twin of BaseBlockDevice's checked boundary. Given what was
 * negotiated, says which errno a request must be refused with, or null when it is acceptable.
 * Pure (no device, no socket), so the server applies it to what it receives and a client can
 * check what it is about to send against the same rules.
 */
import { Command, CommandFlag, MAX_PAYLOAD_BYTES, NbdErrno, TransmissionFlag, nameOfCommand } from './constants.js'
import { offsetText, type RequestHeader } from './request.js'

/** What the transmission phase of one connection agreed on. */
export interface NegotiatedSession {
  readonly exportName: string
  readonly sizeBytes: number
  readonly transmissionFlags: number
  readonly structured: boolean
  /** At least one meta context is selected for this export. */
  readonly hasContexts: boolean
}

/** Returns the errno to refuse the request with, and why, or null if it is acceptable. */
export function validateRequest(header: RequestHeader, session: NegotiatedSession): [number, string] | null {
  const flags = session.transmissionFlags
  const { type, offset, length } = header
  let allowed = (flags & TransmissionFlag.SEND_FUA) !== 0 ? CommandFlag.FUA : 0
  switch (type) {
    case Command.READ:
      if (session.structured) allowed |= CommandFlag.DF
      break
    case Command.WRITE_ZEROES:
      allowed |= CommandFlag.NO_HOLE
      if ((flags & TransmissionFlag.SEND_FAST_ZERO) !== 0) allowed |= CommandFlag.FAST_ZERO
      break
    case Command.BLOCK_STATUS:
      allowed |= CommandFlag.REQ_ONE
      break
    case Command.WRITE:
    case Command.FLUSH:
    case Command.TRIM:
    case Command.CACHE:
      break
    default:
      return [NbdErrno.EINVAL, `unknown command ${type}`]
  }
  if ((header.flags & ~allowed) !== 0) {
    return [NbdErrno.EINVAL, `flags 0x${header.flags.toString(16)} not valid for ${nameOfCommand(type)}`]
  }
  const isWrite = type === Command.WRITE || type === Command.WRITE_ZEROES || type === Command.TRIM
  if (isWrite && (flags & TransmissionFlag.READ_ONLY) !== 0) return [NbdErrno.EPERM, `export '${session.exportName}' is read-only`]
  if (type === Command.TRIM && (flags & TransmissionFlag.SEND_TRIM) === 0) return [NbdErrno.EINVAL, 'trim is not supported']
  if (type === Command.FLUSH) {
    if (offset !== 0 || length !== 0) return [NbdErrno.EINVAL, 'flush offset and length must be 0']
    return null
  }
  const size = session.sizeBytes
  if (offset + length > size) {
    const errno = type === Command.WRITE || type === Command.WRITE_ZEROES ? NbdErrno.ENOSPC : NbdErrno.EINVAL
    return [errno, `range ${offsetText(header)}+${length} is beyond the end of the export (${size} bytes)`]
  }
  if ((type === Command.READ || type === Command.WRITE) && length > MAX_PAYLOAD_BYTES) {
    return [NbdErrno.EINVAL, `${nameOfCommand(type)} of ${length} bytes exceeds the maximum payload ${MAX_PAYLOAD_BYTES}`]
  }
  if (type === Command.BLOCK_STATUS) {
    if (!session.hasContexts || !session.structured) return [NbdErrno.EINVAL, 'no meta context was selected']
    if (length === 0) return [NbdErrno.EINVAL, 'block status of length 0']
  }
  return null
}
