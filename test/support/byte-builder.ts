/**
 * An independent little-endian byte builder and a hand-made kernel COW image, for golden tests
 * of format/ and store/. Deliberately shares nothing with src/format: the layout rules below are
 * transcribed from the reference (§2.1–§2.3), so a bug in the shared code cannot cancel out.
 *
 *   chunk 0               header: magic "SnAp", valid, version, chunk_size (sectors), zeros
 *   chunk 1 + k*(E+1)     metadata area k: E entries of { u64 old_chunk, u64 new_chunk }
 *   E = chunkBytes / 16
 */

export type U64 = number | bigint

/** Appends little-endian fields; `build()` returns the bytes written so far. */
export class ByteBuilder {
  private readonly parts: number[] = []

  u8(value: number): this {
    if (!Number.isInteger(value) || value < 0 || value > 0xff) throw new RangeError(`u8 out of range: ${value}`)
    this.parts.push(value)
    return this
  }

  u32le(value: number): this {
    if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw new RangeError(`u32 out of range: ${value}`)
    let v = value
    for (let i = 0; i < 4; i++) {
      this.parts.push(v % 256)
      v = Math.floor(v / 256)
    }
    return this
  }

  u64le(value: U64): this {
    let v = BigInt(value)
    if (v < 0n || v > 0xffffffffffffffffn) throw new RangeError(`u64 out of range: ${value}`)
    for (let i = 0; i < 8; i++) {
      this.parts.push(Number(v & 0xffn))
      v >>= 8n
    }
    return this
  }

  zeros(n: number): this {
    for (let i = 0; i < n; i++) this.parts.push(0)
    return this
  }

  bytes(data: ArrayLike<number>): this {
    for (let i = 0; i < data.length; i++) this.u8(data[i] as number)
    return this
  }

  /** Pads with zeros up to `length` bytes in total. */
  padTo(length: number): this {
    if (this.parts.length > length) throw new RangeError(`already ${this.parts.length} bytes, cannot pad to ${length}`)
    return this.zeros(length - this.parts.length)
  }

  get length(): number {
    return this.parts.length
  }

  build(): Uint8Array {
    return Uint8Array.from(this.parts)
  }
}

export const KERNEL_MAGIC = 0x70416e53

export interface HeaderFields {
  readonly chunkBytes: number
  readonly valid?: number
  readonly version?: number
  readonly magic?: number
  /** Header chunk size in sectors; defaults to chunkBytes / 512. */
  readonly chunkSectors?: number
}

/** The whole of chunk 0. */
export function buildHeader(fields: HeaderFields): Uint8Array {
  return new ByteBuilder()
    .u32le(fields.magic ?? KERNEL_MAGIC)
    .u32le(fields.valid ?? 1)
    .u32le(fields.version ?? 1)
    .u32le(fields.chunkSectors ?? fields.chunkBytes / 512)
    .padTo(fields.chunkBytes)
    .build()
}

/** One 16-byte exception entry. */
export function buildEntry(oldChunk: U64, newChunk: U64): Uint8Array {
  return new ByteBuilder().u64le(oldChunk).u64le(newChunk).build()
}

/** One metadata area (a whole chunk): the entries, then zeros. */
export function buildArea(chunkBytes: number, entries: ReadonlyArray<readonly [U64, U64]>): Uint8Array {
  const b = new ByteBuilder()
  for (const [oldChunk, newChunk] of entries) b.u64le(oldChunk).u64le(newChunk)
  return b.padTo(chunkBytes).build()
}

export function entriesPerArea(chunkBytes: number): number {
  return chunkBytes / 16
}

/** Chunk number of metadata area k, computed from the reference formula. */
export function areaLocation(chunkBytes: number, k: number): number {
  return 1 + k * (entriesPerArea(chunkBytes) + 1)
}

/** The COW chunk of the i-th allocation on a fresh COW (2, 3, ..., skipping metadata areas). */
export function nthDataChunk(chunkBytes: number, i: number): number {
  const e = entriesPerArea(chunkBytes)
  return 2 + Math.floor(i / e) * (e + 1) + (i % e)
}

export interface CowSpec {
  readonly chunkBytes: number
  readonly cowBytes: number
  readonly valid?: number
  readonly version?: number
  readonly magic?: number
  readonly chunkSectors?: number
  /** Table entries in table order; split E per area. */
  readonly entries: ReadonlyArray<readonly [U64, U64]>
}

/**
 * A kernel COW image of `cowBytes`: header at chunk 0, the entries packed E per area at chunks
 * 1 + k*(E+1), everything else zero (so the area after the last full one reads as a terminator).
 * Areas that would lie beyond `cowBytes` are an error: use a larger image.
 */
export function buildCow(spec: CowSpec): Uint8Array {
  const { chunkBytes, cowBytes, entries } = spec
  const image = new Uint8Array(cowBytes)
  const header = buildHeader({
    chunkBytes,
    ...(spec.valid !== undefined ? { valid: spec.valid } : {}),
    ...(spec.version !== undefined ? { version: spec.version } : {}),
    ...(spec.magic !== undefined ? { magic: spec.magic } : {}),
    ...(spec.chunkSectors !== undefined ? { chunkSectors: spec.chunkSectors } : {}),
  })
  image.set(header.subarray(0, Math.min(chunkBytes, cowBytes)), 0)
  const e = entriesPerArea(chunkBytes)
  for (let k = 0; k * e < entries.length; k++) {
    const at = areaLocation(chunkBytes, k) * chunkBytes
    if (at + chunkBytes > cowBytes) throw new RangeError(`area ${k} at byte ${at} does not fit in ${cowBytes} bytes`)
    image.set(buildArea(chunkBytes, entries.slice(k * e, (k + 1) * e)), at)
  }
  return image
}

/** Hex dump "53 6E 41 70 ..." for readable golden assertions. */
export function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).toUpperCase().padStart(2, '0')).join(' ')
}
