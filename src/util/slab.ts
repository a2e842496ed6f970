/**
 * Small buffers carved out of shared slabs (what Buffer.allocUnsafe's pool does for tiny
 * buffers, for the engine's 4 KiB–64 KiB ones). A first-touch 4 KiB write needs a buffer for
 * the old data it copies out and one for the held copy of its new data; one ArrayBuffer each
 * made allocation and garbage collection a visible part of the write path's profile. A slab
 * is freed by the garbage collector once no view into it is left.
 */
const SLAB_BYTES = 1024 * 1024
/** Larger requests get a buffer of their own. */
const MAX_SLAB_PIECE_BYTES = 64 * 1024

let slab = new ArrayBuffer(SLAB_BYTES)
let used = 0

/** A view of `bytes` bytes, which the caller overwrites in full (they are not zeroed). */
export function slabBytes(bytes: number): Uint8Array {
  if (bytes > MAX_SLAB_PIECE_BYTES) return new Uint8Array(bytes)
  if (used + bytes > SLAB_BYTES) {
    slab = new ArrayBuffer(SLAB_BYTES)
    used = 0
  }
  const view = new Uint8Array(slab, used, bytes)
  used += (bytes + 7) & ~7 // 8-byte aligned, like the allocator's own buffers
  return view
}
