/**
 * Runs one validated transmission-phase request against its export's device and answers it
 * through the connection's replies. The device contract does the rest: errors become wire errnos
 * only through errno.ts.
 */
import { Command, CommandFlag, NbdErrno, nameOfCommand } from '../protocol/nbd/constants.js'
import { normalizeExtents } from '../protocol/nbd/extents.js'
import { buildBlockStatusChunk, type Extent } from '../protocol/nbd/reply.js'
import type { RequestHeader } from '../protocol/nbd/request.js'
import { describeError, nbdErrnoFor } from './errno.js'
import type { NbdExport } from './export.js'
import type { NbdLogger } from './logger.js'

/** Write zeros in pieces no larger than this, so a huge WRITE_ZEROES never allocates much. */
const ZERO_PIECE_BYTES = 1024 * 1024

/** How a request is answered; the connection frames them as simple or structured replies. */
export interface RequestReplies {
  ok(header: RequestHeader): void
  read(header: RequestHeader, data: Buffer): void
  error(header: RequestHeader, errno: number, message: string, logged?: boolean): void
  /** Structured chunks of one reply, the last carrying DONE. */
  chunks(chunks: readonly Buffer[]): void
}

export interface DispatchTarget {
  readonly exp: NbdExport
  /** Selected meta contexts; context id = index + 1. */
  readonly contexts: readonly string[]
  readonly label: string
  readonly log: NbdLogger
  readonly replies: RequestReplies
  /** A request the device failed for the client's reasons (not because the export went away). */
  readonly requestFailed: (command: string, errno: number, message: string) => void
}

export async function dispatchRequest(target: DispatchTarget, header: RequestHeader, payload: Buffer | null): Promise<void> {
  const { exp, replies } = target
  const device = exp.device
  const fua = (header.flags & CommandFlag.FUA) !== 0
  try {
    switch (header.type) {
      case Command.READ: {
        // Zeroed, not allocUnsafe: if a device ever under-fills, stale heap must not reach the wire.
        const data = Buffer.alloc(header.length)
        await device.readInto(data, header.offset)
        replies.read(header, data)
        return
      }
      case Command.WRITE: {
        await device.write(payload!, header.offset, { fua: fua && device.capabilities.fua })
        if (fua && !device.capabilities.fua) await device.flush()
        break
      }
      case Command.FLUSH:
        await device.flush()
        break
      case Command.TRIM:
        await device.discard(header.offset, header.length)
        if (fua) await device.flush()
        break
      case Command.WRITE_ZEROES:
        if (!(await writeZeroes(target, header))) return
        if (fua) await device.flush()
        break
      case Command.CACHE:
        // A prefetch hint; every device here is either memory or page-cached, so nothing to do.
        break
      case Command.BLOCK_STATUS:
        await blockStatus(target, header)
        return
    }
    replies.ok(header)
  } catch (err) {
    // A request in flight when the export went away fails because it did (device closed or
    // handed to a merge): the client is told to disconnect, not that its disk is bad.
    const gone = exp.withdrawn?.() ?? null
    const errno = gone !== null ? NbdErrno.ESHUTDOWN : nbdErrnoFor(err, header.type)
    const message = gone ?? describeError(err)
    const level = errno === NbdErrno.EIO ? 'warn' : 'debug'
    target.log[level](`${target.label}: ${nameOfCommand(header.type)} ${header.offset}+${header.length} failed: ${message}`)
    if (gone === null) target.requestFailed(nameOfCommand(header.type), errno, message)
    replies.error(header, errno, message, true)
  }
}

/** Returns false if it already replied (FAST_ZERO refused). */
async function writeZeroes(target: DispatchTarget, header: RequestHeader): Promise<boolean> {
  const { exp } = target
  const device = exp.device
  const mayPunch = (header.flags & CommandFlag.NO_HOLE) === 0 && device.capabilities.discard
  if ((header.flags & CommandFlag.FAST_ZERO) !== 0 && !(mayPunch && exp.fastZero !== false)) {
    target.replies.error(header, NbdErrno.ENOTSUP, 'zeroing this range is not faster than writing')
    return false
  }
  if (mayPunch) {
    // BlockDevice contract: a discarded range reads back as zeros.
    await device.discard(header.offset, header.length)
    return true
  }
  const end = header.offset + header.length
  const zeros = Buffer.alloc(Math.min(ZERO_PIECE_BYTES, header.length))
  for (let at = header.offset; at < end; at += ZERO_PIECE_BYTES) {
    // One buffer for every piece: a device does not keep what it was given (BlockDevice contract).
    await device.write(zeros.subarray(0, Math.min(ZERO_PIECE_BYTES, end - at)), at)
  }
  return true
}

async function blockStatus(target: DispatchTarget, header: RequestHeader): Promise<void> {
  const { exp, contexts } = target
  const reqOne = (header.flags & CommandFlag.REQ_ONE) !== 0
  const chunks: Buffer[] = []
  for (let i = 0; i < contexts.length; i++) {
    const context = contexts[i]!
    let raw: readonly Extent[] | undefined
    if (exp.blockStatus) raw = await exp.blockStatus(context, header.offset, header.length)
    const extents = normalizeExtents(raw ?? [], header.length, reqOne)
    chunks.push(buildBlockStatusChunk(0, header.cookieHi, header.cookieLo, i + 1, extents))
  }
  target.replies.chunks(chunks)
}
