/**
 * Reusable buffers for WRITE payloads. A 1 MiB payload assembled from socket reads into a fresh
 * buffer costs page faults and, when freed, unmapping: on this workload the server spent more
 * time in the kernel than in JavaScript. Since plain sockets read payloads into their own buffer
 * (direct-receive.ts), 4 KiB payloads need one each too, so they are pooled as well. Buffers are
 * handed back once the device write has settled, which the BlockDevice contract allows (a device
 * does not keep `data` past that).
 * One pool serves every connection of a server, holds at most `maxPooledBytes` of free buffers,
 * and is trimmed when the last client leaves.
 */
export class PayloadPool {
  /** Payloads smaller than this come from node's allocator as before. */
  readonly minBytes: number
  private readonly maxPooledBytes: number
  private readonly free = new Map<number, Buffer[]>()
  private readonly owned = new WeakSet<Buffer>()
  private pooledBytes = 0

  constructor(options: { minBytes?: number; maxPooledBytes?: number } = {}) {
    this.minBytes = options.minBytes ?? 4 * 1024
    this.maxPooledBytes = options.maxPooledBytes ?? 32 * 1024 * 1024
  }

  /** A buffer of exactly `length` bytes, contents undefined. */
  acquire(length: number): Buffer {
    if (length < this.minBytes) return Buffer.allocUnsafe(length)
    const buf = this.free.get(length)?.pop()
    if (buf) {
      this.pooledBytes -= length
      return buf
    }
    // Its own ArrayBuffer (allocUnsafeSlow): never a slice of node's shared pool.
    const fresh = Buffer.allocUnsafeSlow(length)
    this.owned.add(fresh)
    return fresh
  }

  /** Bytes held in free buffers. */
  get freeBytes(): number {
    return this.pooledBytes
  }

  /** Lets go of every free buffer (when no client is left, their memory should go back too). */
  trim(): void {
    this.free.clear()
    this.pooledBytes = 0
  }

  /** Takes back a buffer from acquire() once nobody uses it; anything else is ignored. */
  release(buf: Buffer): void {
    if (!this.owned.has(buf) || this.pooledBytes + buf.length > this.maxPooledBytes) return
    const list = this.free.get(buf.length)
    if (list) list.push(buf)
    else this.free.set(buf.length, [buf])
    this.pooledBytes += buf.length
  }
}
