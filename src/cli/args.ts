/**
 * The command line's argument grammar, one parser per kind of value, shared by every command
 * (README "CLI guide" and `--help` describe it): byte counts take bytes or K/M/G/T, with an
 * optional B/iB (units.ts parseSize); rates are a byte count per second, with or without `/s`;
 * a share of something is `N%`. A value that does not parse is a usage error (exit 2).
 */
import { checkChunkSizeBytes, parseRate, parseShare, parseSize } from '../units.js'
import { UsageError } from './render.js'

const SIZE_GRAMMAR = 'bytes, or a number with K, M, G or T'

export function sizeArg(what: string) {
  return (text: string): number => {
    const n = parseSize(text)
    if (Number.isNaN(n)) throw new UsageError(`invalid ${what} '${text}' (${SIZE_GRAMMAR}, at most 2^53 - 1 bytes)`)
    return n
  }
}

export function positiveSizeArg(what: string) {
  return (text: string): number => {
    const n = sizeArg(what)(text)
    if (n <= 0) throw new UsageError(`invalid ${what} '${text}' (more than 0 bytes)`)
    return n
  }
}

export function chunkArg(text: string): number {
  const n = sizeArg('chunk size')(text)
  try {
    checkChunkSizeBytes(n)
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
  return n
}

/** Bytes per second: "24M", "24M/s", "24MiB/s", "0". */
export function rateArg(what: string) {
  return (text: string): number => {
    const n = parseRate(text)
    if (Number.isNaN(n)) throw new UsageError(`invalid ${what} '${text}' (bytes per second: ${SIZE_GRAMMAR}, optionally followed by /s)`)
    return n
  }
}

/** A byte count, or a share `N%` of something the command knows (e.g. the origin's size). */
export type SizeOrShare = { readonly bytes: number } | { readonly percent: number }

export function sizeOrShareArg(what: string, of: string) {
  return (text: string): SizeOrShare => {
    const percent = parseShare(text)
    if (!Number.isNaN(percent)) return { percent }
    if (text.trim().endsWith('%')) throw new UsageError(`invalid ${what} '${text}' (a share is more than 0%, e.g. 20%)`)
    const bytes = parseSize(text)
    if (Number.isNaN(bytes)) throw new UsageError(`invalid ${what} '${text}' (${SIZE_GRAMMAR}, or N% of ${of})`)
    return { bytes }
  }
}

/** A count or a number of seconds: plain digits. */
export function intArg(what: string) {
  return (text: string): number => {
    if (!/^\d+$/.test(text)) throw new UsageError(`invalid ${what} '${text}' (a non-negative integer)`)
    const n = Number(text)
    if (!Number.isSafeInteger(n)) throw new UsageError(`${what} '${text}' is too large`)
    return n
  }
}

export function positiveArg(what: string) {
  return (text: string): number => {
    const n = intArg(what)(text)
    if (n === 0) throw new UsageError(`invalid ${what} '${text}' (at least 1)`)
    return n
  }
}
