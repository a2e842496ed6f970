/**
 * Metadata areas: each is one chunk holding E entries of 16 bytes,
 *
 *   offset 0 u64 LE old_chunk   origin chunk (in this snapshot's chunk size)
 *   offset 8 u64 LE new_chunk   COW chunk holding the saved data
 *
 * The table ends at the first entry whose new_chunk is 0 (chunk 0 is the header, so no real
 * exception points there). u64 values are decoded exactly and rejected above 2^53.
 */
import { corrupt } from '../errors.js'
import type { ExceptionList } from './exception-list.js'
import { ENTRY_BYTES } from './layout.js'

export interface ExceptionEntry {
  readonly oldChunk: number
  readonly newChunk: number
}

const TWO_32 = 2 ** 32

/**
 * Returns `hi`, the high word of the u64 (`hi`, `lo`) at byte `at`, once it is known to fit in 53
 * bits; the error quotes the value exactly (as a bigint: a Number would round it).
 */
function checkHighWord(hi: number, lo: number, at: number, what: string): number {
  if (hi >= 0x200000) {
    const value = (BigInt(hi) << 32n) | BigInt(lo)
    throw corrupt(`${what} ${value} at byte ${at} does not fit in 53 bits`, { offset: at })
  }
  return hi
}

function readU64(view: DataView, at: number, what: string): number {
  const lo = view.getUint32(at, true)
  return checkHighWord(view.getUint32(at + 4, true), lo, at, what) * TWO_32 + lo
}

/** A u64 written straight into the bytes (little endian): no DataView per entry on the commit path. */
function putU64(area: Uint8Array, at: number, value: number): void {
  const lo = value % TWO_32
  const hi = Math.floor(value / TWO_32)
  // a Uint8Array element keeps the low 8 bits of what it is given
  area[at] = lo
  area[at + 1] = lo >>> 8
  area[at + 2] = lo >>> 16
  area[at + 3] = lo >>> 24
  area[at + 4] = hi
  area[at + 5] = hi >>> 8
  area[at + 6] = hi >>> 16
  area[at + 7] = hi >>> 24
}

export function writeEntry(area: Uint8Array, index: number, oldChunk: number, newChunk: number): void {
  if (index < 0 || (index + 1) * ENTRY_BYTES > area.length) throw new RangeError(`entry ${index} is outside the area`)
  putU64(area, index * ENTRY_BYTES, oldChunk)
  putU64(area, index * ENTRY_BYTES + 8, newChunk)
}

export function clearEntries(area: Uint8Array, fromIndex: number, toIndex: number): void {
  area.fill(0, fromIndex * ENTRY_BYTES, toIndex * ENTRY_BYTES)
}

export function readEntry(area: Uint8Array, index: number): ExceptionEntry {
  const view = new DataView(area.buffer, area.byteOffset, area.byteLength)
  return {
    oldChunk: readU64(view, index * ENTRY_BYTES, 'old_chunk'),
    newChunk: readU64(view, index * ENTRY_BYTES + 8, 'new_chunk'),
  }
}

export interface DecodedArea {
  /** Entries before the terminator, in table order. */
  readonly entries: ExceptionEntry[]
  /** True when all E entries are in use: the next area must be read. */
  readonly full: boolean
}

export function decodeArea(area: Uint8Array): DecodedArea {
  const capacity = area.length / ENTRY_BYTES
  const view = new DataView(area.buffer, area.byteOffset, area.byteLength)
  const entries: ExceptionEntry[] = []
  for (let i = 0; i < capacity; i++) {
    const newChunk = readU64(view, i * ENTRY_BYTES + 8, 'new_chunk')
    if (newChunk === 0) return { entries, full: false }
    entries.push({ oldChunk: readU64(view, i * ENTRY_BYTES, 'old_chunk'), newChunk })
  }
  return { entries, full: true }
}

/**
 * Appends the area's entries to `out` (the open path: no per-entry object or callback). Returns
 * the number of entries in use. On an entry that does not fit in 53 bits it throws with every
 * entry before it already appended, so a caller can honour table order.
 */
export function decodeAreaInto(area: Uint8Array, out: ExceptionList): number {
  const capacity = area.length / ENTRY_BYTES
  const view = new DataView(area.buffer, area.byteOffset, area.byteLength)
  out.reserve(capacity)
  for (let i = 0; i < capacity; i++) {
    const at = i * ENTRY_BYTES
    const nLo = view.getUint32(at + 8, true)
    const nHi = view.getUint32(at + 12, true)
    if (nLo === 0 && nHi === 0) return i
    // same checks, in the same order, as decodeArea's readU64 calls
    checkHighWord(nHi, nLo, at + 8, 'new_chunk')
    const oLo = view.getUint32(at, true)
    const oHi = checkHighWord(view.getUint32(at + 4, true), oLo, at, 'old_chunk')
    out.pushWords(oLo, oHi, nLo, nHi)
  }
  return capacity
}
