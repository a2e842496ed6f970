/** The single mapping from outcomes to process exit codes (docs/errors.md lists it per code). */
import type { SnapErrorCode } from '../errors.js'

export const EXIT_OK = 0
/** Any failure without a code of its own below. */
export const EXIT_ERROR = 1
/** The command line is malformed (code SNAP_USAGE). */
export const EXIT_USAGE = 2
/** `check` found damage: the command worked, the data did not pass. */
export const EXIT_DAMAGE = 3
/** The volume (or a resource it needs) is busy or locked by someone else (code SNAP_BUSY). */
export const EXIT_BUSY = 4
/**
 * The reader of our output went away (`blocksnap list | head -1`): the status a shell reports for
 * a process that SIGPIPE ended, 128 + 13, as coreutils' tools end there.
 */
export const EXIT_BROKEN_PIPE = 141

/**
 * What an error line can carry: the library's codes, plus two only the command line raises —
 * SNAP_USAGE for a malformed command line and SNAP_INTERNAL for a bug (an error that is none of
 * the others).
 */
export type CliErrorCode = SnapErrorCode | 'SNAP_USAGE' | 'SNAP_INTERNAL'

export function exitCodeFor(code: CliErrorCode): number {
  if (code === 'SNAP_USAGE') return EXIT_USAGE
  if (code === 'SNAP_BUSY') return EXIT_BUSY
  return EXIT_ERROR
}
