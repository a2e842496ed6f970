/**
 * An independent decoder of a persistent COW image, written from the format description
 * (dm-snapshot-behaviour.md §2.2, §2.3, §2.7) plus blocksnap's documented stricter rules. It
 * shares no code with src/format or src/store: it says what opening the image must do.
 *
 * Kernel rules: chunk 0 is the header (magic 0 means a new COW, another magic than "SnAp" is an
 * error; the header chunk size wins and must be legal; version must be 1; valid 0 loads as
 * invalid without reading areas). Areas are read in order; the first entry whose new_chunk is 0
 * ends the table; a full area means the next one is read, and an area that is not there fails.
 * blocksnap also refuses: values above 2^53, entries whose new_chunk is not a data chunk inside
 * the device (the kernel would read garbage or fail I/O later), and an origin chunk listed twice.
 */
export type Verdict =
  | { readonly kind: 'refuse'; readonly codes: readonly string[]; readonly why: string }
  | { readonly kind: 'new'; readonly chunkBytes: number }
  | { readonly kind: 'invalid'; readonly chunkBytes: number }
  | {
      readonly kind: 'table'
      readonly chunkBytes: number
      /** origin chunk -> COW chunk */
      readonly table: ReadonlyMap<number, number>
      /** One past the highest COW chunk referenced (before skipping a metadata chunk). */
      readonly highest: number
      /** Some COW chunk is used by two entries (legal for the kernel; check reports it). */
      readonly sharedNewChunk: boolean
    }

const MAGIC = 0x70416e53
const TWO_53 = 2 ** 53

function u32(image: Uint8Array, at: number): number {
  return (image[at]! | (image[at + 1]! << 8) | (image[at + 2]! << 16)) + image[at + 3]! * 0x1000000
}

/** u64 little-endian as a Number, or Infinity when it is 2^53 or more. */
function u64(image: Uint8Array, at: number): number {
  const lo = u32(image, at)
  const hi = u32(image, at + 4)
  if (hi >= 0x200000) return Infinity
  return hi * 0x100000000 + lo
}

function legalChunkBytes(bytes: number): boolean {
  return bytes >= 512 && bytes <= 512 * 1024 && (bytes & (bytes - 1)) === 0
}

const corrupt = (why: string): Verdict => ({ kind: 'refuse', codes: ['SNAP_CORRUPT_METADATA'], why })

/** `suppliedChunkBytes`: the chunk size the caller opens the store with. */
export function decodeCow(image: Uint8Array, suppliedChunkBytes: number): Verdict {
  const size = image.length
  if (size < 512) return corrupt('smaller than a header')
  const magic = u32(image, 0)
  if (magic === 0) {
    // A new COW: the store writes a header and area 0, which needs two chunks.
    if (size < 2 * suppliedChunkBytes) return { kind: 'refuse', codes: ['SNAP_NO_SPACE'], why: 'new COW too small' }
    return { kind: 'new', chunkBytes: suppliedChunkBytes }
  }
  if (magic !== MAGIC) return corrupt('bad magic')
  const chunkBytes = u32(image, 12) * 512
  if (!legalChunkBytes(chunkBytes)) return { kind: 'refuse', codes: ['SNAP_BAD_CHUNK_SIZE'], why: `chunk size ${chunkBytes}` }
  if (u32(image, 8) !== 1) return { kind: 'refuse', codes: ['SNAP_BAD_FORMAT_VERSION'], why: 'version' }
  if (u32(image, 4) === 0) return { kind: 'invalid', chunkBytes }
  const perArea = chunkBytes / 16
  const stride = perArea + 1
  const cowChunks = Math.floor(size / chunkBytes)
  const table = new Map<number, number>()
  const usedNew = new Set<number>()
  let sharedNewChunk = false
  let highest = 2
  for (let area = 0; ; area++) {
    const at = 1 + area * stride
    if (at >= cowChunks) return corrupt(`area ${area} beyond the end`)
    const base = at * chunkBytes
    for (let i = 0; i < perArea; i++) {
      const entry = base + 16 * i
      const newChunk = u64(image, entry + 8)
      if (newChunk === 0) return { kind: 'table', chunkBytes, table, highest, sharedNewChunk }
      if (newChunk === Infinity) return corrupt('new_chunk above 2^53')
      const oldChunk = u64(image, entry)
      if (oldChunk === Infinity) return corrupt('old_chunk above 2^53')
      // No origin reaches 2^53 bytes, so such an entry cannot describe any origin chunk.
      if (oldChunk * chunkBytes >= TWO_53) return corrupt(`old_chunk ${oldChunk} is beyond 2^53 bytes`)
      if (newChunk >= cowChunks || newChunk % stride === 1) return corrupt(`new_chunk ${newChunk} is not a data chunk`)
      if (table.has(oldChunk)) return corrupt(`old_chunk ${oldChunk} twice`)
      if (usedNew.has(newChunk)) sharedNewChunk = true
      usedNew.add(newChunk)
      table.set(oldChunk, newChunk)
      if (newChunk + 1 > highest) highest = newChunk + 1
    }
  }
}

/** The snapshot's view of an origin holding `origin`, per a 'table' or 'new' verdict. */
export function expectedView(verdict: Verdict, image: Uint8Array, origin: Uint8Array): Uint8Array {
  const view = origin.slice()
  if (verdict.kind !== 'table') return view
  const { chunkBytes, table } = verdict
  for (const [oldChunk, newChunk] of table) {
    const start = oldChunk * chunkBytes
    if (start >= origin.length) continue
    const length = Math.min(chunkBytes, origin.length - start)
    view.set(image.subarray(newChunk * chunkBytes, newChunk * chunkBytes + length), start)
  }
  return view
}
