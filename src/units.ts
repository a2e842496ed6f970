/**
 * Units and safe-integer arithmetic. Offsets are plain numbers in bytes unless the name says
 * otherwise (`sector`, `chunk`). Bit shifts are 32-bit in JavaScript, so nothing here shifts:
 * every conversion multiplies or divides, and every value is checked to stay below 2^53.
 */
import { SnapError, outOfRange } from './errors.js'

export const SECTOR_BYTES = 512
export const MAX_SAFE = Number.MAX_SAFE_INTEGER

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n
}

export function log2(n: number): number {
  return Math.round(Math.log2(n))
}

export function assertSafeOffset(offset: number, what = 'offset'): void {
  if (!Number.isSafeInteger(offset) || offset < 0) throw outOfRange(`${what} ${offset} is not a non-negative safe integer`)
}

export function bytesToSectors(bytes: number): number {
  return Math.floor(bytes / SECTOR_BYTES)
}

/** Smallest chunk 512 B, largest 512 KiB: what blocksnap supports (the kernel allows up to 1 GiB). */
export const MIN_CHUNK_BYTES = 512
export const MAX_CHUNK_BYTES = 512 * 1024
export const DEFAULT_CHUNK_BYTES = 4096

export function checkChunkSizeBytes(chunkSizeBytes: number): void {
  if (!isPowerOfTwo(chunkSizeBytes) || chunkSizeBytes < MIN_CHUNK_BYTES || chunkSizeBytes > MAX_CHUNK_BYTES) {
    throw new SnapError(
      'SNAP_BAD_CHUNK_SIZE',
      `chunk size ${chunkSizeBytes} is not a power of two between ${MIN_CHUNK_BYTES} and ${MAX_CHUNK_BYTES} bytes`,
    )
  }
}

/**
 * The command line's one grammar for byte counts: digits, optionally followed by K, M, G or T
 * (powers of 1024, either case) and an optional `B` or `iB`, or by a bare `B`: "4096", "512B",
 * "4K", "4KiB", "16M", "1G", "2T". Returns NaN on anything else, and on a value above 2^53 - 1:
 * the arithmetic is done in BigInt, so a value too large is refused exactly, never rounded to a
 * representable neighbour.
 */
export function parseSize(text: string): number {
  const m = /^(\d+)(?:([KMGT])(?:i?B)?|B)?$/i.exec(text.trim())
  if (!m) return Number.NaN
  const exponent = m[2] === undefined ? 0 : 'KMGT'.indexOf(m[2].toUpperCase()) + 1
  const value = BigInt(m[1] as string) * 1024n ** BigInt(exponent)
  return value <= BigInt(MAX_SAFE) ? Number(value) : Number.NaN
}

/** A rate in bytes per second: a size, with or without `/s` ("24M", "24M/s", "24MiB/s", "0"). NaN otherwise. */
export function parseRate(text: string): number {
  return parseSize(text.trim().replace(/\/s$/i, ''))
}

/**
 * A share of something, as a percentage: "20%", "12.5%" (more than 0). Returns the number of
 * percent, or NaN when `text` is not a share.
 */
export function parseShare(text: string): number {
  const m = /^(\d+(?:\.\d+)?)%$/.exec(text.trim())
  if (!m) return Number.NaN
  const percent = Number(m[1])
  return percent > 0 && Number.isFinite(percent) ? percent : Number.NaN
}
