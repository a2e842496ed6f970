/**
 * How the command line reports, in one place: results as `--json` documents (each one line of
 * JSON with `"version": 1`, docs/json.md), and failures as one line carrying the stable code —
 * `blocksnap: error [SNAP_BUSY]: …`, or under --json `{"version":1,"error":{"code":…,"message":…}}`
 * on stderr — with the exit code exit-codes.ts assigns to that code.
 */
import { CommanderError } from 'commander'
import { isSnapError } from '../errors.js'
import { type CliErrorCode, exitCodeFor } from './exit-codes.js'

/** The version of every --json document; bumped only when a field changes meaning or goes away. */
export const JSON_VERSION = 1

/** A malformed command line (exit 2, code SNAP_USAGE). */
export class UsageError extends Error {}

/** True when the command line asks for --json (before any `--`): errors are then JSON too. */
export function wantsJson(argv: readonly string[]): boolean {
  const end = argv.indexOf('--')
  return (end === -1 ? argv : argv.slice(0, end)).includes('--json')
}

/** One --json document as one line: `{"version":1, ...fields}`. */
export function jsonLine(fields: Record<string, unknown>): string {
  return `${JSON.stringify({ version: JSON_VERSION, ...fields })}\n`
}

export function printJson(fields: Record<string, unknown>): void {
  process.stdout.write(jsonLine(fields))
}

/** Commander's own outcomes that are not failures. */
export function isHelpOrVersion(err: unknown): boolean {
  return err instanceof CommanderError && ['commander.helpDisplayed', 'commander.version', 'commander.help'].includes(err.code)
}

/** The stable code and the one-line message for anything a command threw. */
export function describeError(err: unknown): { code: CliErrorCode; message: string } {
  if (err instanceof CommanderError) return { code: 'SNAP_USAGE', message: err.message.replace(/^error: /, '') }
  if (err instanceof UsageError) return { code: 'SNAP_USAGE', message: err.message }
  if (isSnapError(err)) return { code: err.code, message: err.message }
  const e = err as NodeJS.ErrnoException
  if (e && typeof e.code === 'string' && typeof e.message === 'string') {
    // A system error no layer wrapped (a file the CLI itself opens): the code nearest to its errno.
    const code = e.code === 'ENOENT' ? 'SNAP_NOT_FOUND' : e.code === 'ENOSPC' || e.code === 'EDQUOT' ? 'SNAP_NO_SPACE' : 'SNAP_IO'
    return { code, message: e.message }
  }
  // A bug: say so, with the stack, so it can be reported.
  return { code: 'SNAP_INTERNAL', message: `internal error: ${String((err as Error)?.stack ?? err)}` }
}

/** Writes the error (text or JSON) on stderr and returns the exit code for it. */
export function reportError(err: unknown, json: boolean): number {
  const { code, message } = describeError(err)
  process.stderr.write(json ? jsonLine({ error: { code, message } }) : `blocksnap: error [${code}]: ${message}\n`)
  return exitCodeFor(code)
}
