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

/** Parses "4096", "4K", "16M", "1G", "2T" (powers of 1024). Returns NaN on anything else. */
export function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]?)(i?B)?$/i.exec(text.trim())
  if (!m) return Number.NaN
  const factor = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[(m[2] ?? '').toUpperCase() as '' | 'K' | 'M' | 'G' | 'T']
  const value = Number(m[1]) * factor
  return Number.isSafeInteger(value) ? value : Number.NaN
}
