/**
 * A FIFO of received byte chunks, for parsers that must cope with frames arriving in arbitrary
 * pieces (TCP and TLS give no framing guarantees).
 *
 * Design notes: chunks are kept as received and only concatenated when a caller asks for a
 * span that crosses chunk boundaries, so a header that arrives whole is parsed straight out of
 * the socket's buffer. `skip` discards without copying, which is how refused WRITE payloads are
 * drained without ever allocating them.
 *
 * A chunk pushed as transient lives in a buffer the caller reuses for its next read: takes that
 * the caller keeps (`keep`) copy out of it, and ownTransient() copies whatever of it is left
 * before the buffer is reused.
 */
export class ByteQueue {
  private chunks: Buffer[] = []
  /** Read position inside chunks[0]. */
  private head = 0
  private total = 0
  /** The last chunk pushed, if pushed as transient (null once owned or consumed). */
  private transient: Buffer | null = null

  get length(): number {
    return this.total
  }

  push(chunk: Uint8Array, transient = false): void {
    if (chunk.length === 0) return
    this.ownTransient()
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length)
    this.chunks.push(buf)
    this.total += buf.length
    this.transient = transient ? buf : null
  }

  /** Copies what is left of the transient chunk into memory of the queue's own, so its buffer can be reused. */
  ownTransient(): void {
    const chunk = this.transient
    if (chunk === null) return
    this.transient = null
    // Only the last chunk can be transient: push() owns the previous one first.
    const last = this.chunks.length - 1
    if (last < 0 || this.chunks[last] !== chunk) return
    const from = last === 0 ? this.head : 0
    this.chunks[last] = Buffer.from(chunk.subarray(from))
    if (last === 0) this.head = 0
  }

  /**
   * Removes and returns exactly `n` bytes, or null if fewer are buffered. The result may be a
   * view into a received chunk: callers that keep it must not expect it to be private memory
   * beyond the request's lifetime (chunks are never reused by us, so views stay valid). Bytes
   * that span chunks are copied into a buffer from `alloc`, and so are bytes of a transient
   * chunk when the caller will `keep` them past the next read.
   */
  take(n: number, alloc: (n: number) => Buffer = Buffer.allocUnsafe, keep = false): Buffer | null {
    if (n > this.total) return null
    if (n === 0) return Buffer.alloc(0)
    const first = this.chunks[0]!
    if (first.length - this.head >= n && !(keep && first === this.transient)) {
      const out = first.subarray(this.head, this.head + n)
      this.advance(n)
      return out
    }
    const out = alloc(n)
    let filled = 0
    while (filled < n) {
      const chunk = this.chunks[0]!
      const count = Math.min(n - filled, chunk.length - this.head)
      chunk.copy(out, filled, this.head, this.head + count)
      filled += count
      this.advance(count)
    }
    return out
  }

  /** The next four bytes as a big-endian u32, without consuming them (null: not here yet). */
  peekU32(): number | null {
    if (this.total < 4) return null
    const first = this.chunks[0]!
    if (first.length - this.head >= 4) return first.readUInt32BE(this.head)
    let value = 0
    let chunk = 0
    let at = this.head
    for (let i = 0; i < 4; i++) {
      while (at >= this.chunks[chunk]!.length) {
        chunk++
        at = 0
      }
      value = value * 256 + this.chunks[chunk]![at++]!
    }
    return value
  }

  /** Moves up to `target.length - at` bytes into `target` from `at` on; returns how many. */
  takeInto(target: Buffer, at: number): number {
    let filled = at
    while (filled < target.length && this.total > 0) {
      const chunk = this.chunks[0]!
      const count = Math.min(target.length - filled, chunk.length - this.head)
      chunk.copy(target, filled, this.head, this.head + count)
      filled += count
      this.advance(count)
    }
    return filled - at
  }

  /** Discards up to `n` bytes; returns how many were discarded. */
  skip(n: number): number {
    let skipped = 0
    while (skipped < n && this.total > 0) {
      const chunk = this.chunks[0]!
      const count = Math.min(n - skipped, chunk.length - this.head)
      skipped += count
      this.advance(count)
    }
    return skipped
  }

  /** Drops everything (used when a connection is torn down). */
  clear(): void {
    this.chunks = []
    this.head = 0
    this.total = 0
    this.transient = null
  }

  private advance(n: number): void {
    this.head += n
    this.total -= n
    if (this.head === this.chunks[0]!.length) {
      if (this.chunks.shift() === this.transient) this.transient = null
      this.head = 0
    }
  }
}

/** Reads a u64 as a number. Values above 2^53 lose precision but stay above 2^53, which is all a range check needs. */
export function readU64(buf: Uint8Array, at: number): number {
  const view = Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.length)
  return view.readUInt32BE(at) * 0x1_0000_0000 + view.readUInt32BE(at + 4)
}

/** Writes a safe-integer u64 as two u32 halves. */
export function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 0x1_0000_0000), at)
  buf.writeUInt32BE(value % 0x1_0000_0000, at + 4)
}
