/**
 * The COW header, chunk 0 of a persistent store. Packed, little-endian:
 *
 *   offset 0  u32 magic       0x70416E53 ("SnAp"); 0 means "never initialised"
 *   offset 4  u32 valid       1 usable, 0 invalidated (permanent)
 *   offset 8  u32 version     1
 *   offset 12 u32 chunk_size  in 512-byte sectors
 *
 * The rest of chunk 0 is zero.
 */
import { SnapError, corrupt } from '../errors.js'
import { FORMAT_VERSION, HEADER_BYTES, SNAP_MAGIC } from './layout.js'

export interface CowHeader {
  readonly valid: boolean
  readonly version: number
  readonly chunkSizeSectors: number
}

export type DecodedHeader = { readonly kind: 'new' } | ({ readonly kind: 'existing' } & CowHeader)

/** Encodes a header into a zero-filled buffer of `chunkBytes` (the whole of chunk 0). */
export function encodeHeader(header: CowHeader, chunkBytes: number): Uint8Array {
  const out = new Uint8Array(chunkBytes)
  const view = new DataView(out.buffer)
  view.setUint32(0, SNAP_MAGIC, true)
  view.setUint32(4, header.valid ? 1 : 0, true)
  view.setUint32(8, header.version, true)
  view.setUint32(12, header.chunkSizeSectors, true)
  return out
}

/**
 * Decodes the first bytes of chunk 0. A zero magic means a brand-new COW (other fields are
 * ignored, as the kernel does); any other magic than "SnAp" is corruption. The version is
 * returned, not checked: the caller decides (the kernel checks it only after the chunk size).
 */
export function decodeHeader(bytes: Uint8Array): DecodedHeader {
  if (bytes.length < HEADER_BYTES) throw corrupt(`COW header is truncated (${bytes.length} bytes)`)
  const view = new DataView(bytes.buffer, bytes.byteOffset, HEADER_BYTES)
  const magic = view.getUint32(0, true)
  if (magic === 0) return { kind: 'new' }
  if (magic !== SNAP_MAGIC) {
    throw corrupt(`invalid or corrupt snapshot: bad magic 0x${magic.toString(16).padStart(8, '0')}`)
  }
  return {
    kind: 'existing',
    valid: view.getUint32(4, true) !== 0,
    version: view.getUint32(8, true),
    chunkSizeSectors: view.getUint32(12, true),
  }
}

export function checkVersion(header: CowHeader): void {
  if (header.version !== FORMAT_VERSION) {
    throw new SnapError('SNAP_BAD_FORMAT_VERSION', `unsupported COW format version ${header.version} (only 1 is known)`)
  }
}
