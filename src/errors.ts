/**
 * One error type for the whole library. Callers branch on `code`, never on the message: codes
 * are stable and each one maps to exactly one NBD errno (nbd/errno.ts) and one CLI exit code
 * (cli/exit-codes.ts).
 */
export type SnapErrorCode =
  | 'SNAP_CLOSED' // operation on a closed device, store or snapshot
  | 'SNAP_OUT_OF_RANGE' // offset/length outside the device, or a number above 2^53
  | 'SNAP_READ_ONLY' // write to a read-only device
  | 'SNAP_NOT_SUPPORTED' // capability the device does not have (discard, resize, ...)
  | 'SNAP_IO' // an underlying device failed a read, write or flush
  | 'SNAP_NO_SPACE' // the COW device has no room for another chunk
  | 'SNAP_INVALID' // snapshot is invalid (COW full, I/O error, handed over); I/O is refused
  | 'SNAP_OVERFLOW' // PO snapshot overflowed: writes refused, reads still served
  | 'SNAP_CORRUPT_METADATA' // COW header or exception areas do not decode
  | 'SNAP_BAD_FORMAT_VERSION' // header version is not 1
  | 'SNAP_BAD_CHUNK_SIZE' // chunk size not a power of two, out of bounds, or not a block multiple
  | 'SNAP_BAD_ARGUMENT' // a caller passed something the API does not accept
  | 'SNAP_MERGE_FAILED' // merge stopped on an error; held writes get this
  | 'SNAP_MERGE_REFUSED' // transient store, second merge on an origin, invalid snapshot
  | 'SNAP_BUSY' // resource owned by someone else (volume lock, merge running)
  | 'SNAP_ABORTED' // operation stopped by an AbortSignal or shutdown
  | 'SNAP_NOT_FOUND' // volume, snapshot or file does not exist
  | 'SNAP_EXISTS' // volume or snapshot already exists
  | 'NBD_PROTOCOL' // peer broke the NBD protocol

export interface SnapErrorDetails {
  readonly offset?: number
  readonly length?: number
  readonly chunk?: number
  readonly path?: string
  readonly [key: string]: unknown
}

export class SnapError extends Error {
  readonly code: SnapErrorCode
  readonly details: SnapErrorDetails | undefined

  constructor(code: SnapErrorCode, message: string, options?: { cause?: unknown; details?: SnapErrorDetails }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause })
    this.name = 'SnapError'
    this.code = code
    this.details = options?.details
  }
}

export function isSnapError(err: unknown, code?: SnapErrorCode): err is SnapError {
  return err instanceof SnapError && (code === undefined || err.code === code)
}

// Small factories keep throw sites short and the message style uniform.
export const closed = (what: string) => new SnapError('SNAP_CLOSED', `${what} is closed`)
export const outOfRange = (message: string, details?: SnapErrorDetails) =>
  new SnapError('SNAP_OUT_OF_RANGE', message, details ? { details } : undefined)
export const ioError = (message: string, cause?: unknown, details?: SnapErrorDetails) =>
  new SnapError('SNAP_IO', message, { cause, ...(details ? { details } : {}) })
export const notSupported = (message: string) => new SnapError('SNAP_NOT_SUPPORTED', message)
export const readOnly = (what: string) => new SnapError('SNAP_READ_ONLY', `${what} is read-only`)
export const noSpace = (message: string) => new SnapError('SNAP_NO_SPACE', message)
export const invalid = (message: string) => new SnapError('SNAP_INVALID', message)
export const corrupt = (message: string, details?: SnapErrorDetails) =>
  new SnapError('SNAP_CORRUPT_METADATA', message, details ? { details } : undefined)
export const badArgument = (message: string) => new SnapError('SNAP_BAD_ARGUMENT', message)

/** Wraps a foreign error (errno from fs, etc.) as SNAP_IO unless it already is a SnapError. */
export function asSnapError(err: unknown, message: string, details?: SnapErrorDetails): SnapError {
  if (err instanceof SnapError) return err
  const errno = (err as NodeJS.ErrnoException | undefined)?.code
  if (errno === 'ENOSPC' || errno === 'EDQUOT') {
    return new SnapError('SNAP_NO_SPACE', `${message}: no space left on device`, { cause: err, ...(details ? { details } : {}) })
  }
  const reason = err instanceof Error ? err.message : String(err)
  return ioError(`${message}: ${reason}`, err, details)
}
