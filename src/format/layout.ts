/**
 * Geometry of a persistent COW device (kernel format version 1).
 *
 * The device is an array of chunks. Chunk 0 is the header; metadata area k sits at chunk
 * 1 + k*(E+1) and is followed by the E data chunks it describes, where E = chunkBytes / 16 is
 * the number of 16-byte exception entries one chunk holds. So a chunk c >= 1 is a metadata area
 * exactly when c mod (E+1) == 1.
 */
export const SNAP_MAGIC = 0x70416e53 // "SnAp" as little-endian bytes 53 6E 41 70
export const FORMAT_VERSION = 1
export const ENTRY_BYTES = 16
export const HEADER_BYTES = 16
/** First data chunk of a fresh COW: after the header (0) and area 0 (1). */
export const FIRST_DATA_CHUNK = 2

export interface Layout {
  readonly chunkBytes: number
  /** Exception entries per metadata area (E). */
  readonly exceptionsPerArea: number
  /** Chunks from one area to the next (E + 1). */
  readonly stride: number
}

export function layoutFor(chunkBytes: number): Layout {
  const exceptionsPerArea = chunkBytes / ENTRY_BYTES
  return { chunkBytes, exceptionsPerArea, stride: exceptionsPerArea + 1 }
}

/** Chunk number of metadata area `area`. */
export function areaChunk(layout: Layout, area: number): number {
  return 1 + area * layout.stride
}

export function isMetadataChunk(layout: Layout, chunk: number): boolean {
  return chunk === 0 || chunk % layout.stride === 1
}

/** The chunk handed out after `chunk`, skipping the next metadata area. */
export function nextDataChunk(layout: Layout, chunk: number): number {
  const next = chunk + 1
  return next % layout.stride === 1 ? next + 1 : next
}

/** The COW chunk that entry `index` of area `area` describes when nothing was ever lost. */
export function dataChunkOfEntry(layout: Layout, area: number, index: number): number {
  return areaChunk(layout, area) + 1 + index
}
