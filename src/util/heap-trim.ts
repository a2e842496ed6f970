/**
 * Keeps memory that glibc's malloc frees on its heap for reuse, instead of returning it to the
 * kernel after every burst.
 *
 * Node allocates a fresh 64 KiB buffer for every socket read and 1 MiB and larger buffers with
 * malloc; the garbage collector frees them in batches. By default glibc serves blocks of 128 KiB
 * and more with mmap (unmapped again when freed) and trims the top of its heap once 128 KiB there
 * are free, so the next allocations grow the heap again and fault in every page. Serving 1 MiB
 * NBD writes with no snapshot, the main thread spent most of its time in brk and page faults and
 * the server wrote 0.2-0.5 GiB/s; with the thresholds raised it wrote 1.2-1.9 GiB/s, and 4 KiB
 * first-touch writes with a snapshot ran 1.5x faster (BENCHMARKS.md).
 *
 * glibc raises both thresholds by itself when it frees a block it had mmapped whose size is at
 * most 32 MiB (mallopt(3), "dynamic mmap threshold"): the mmap threshold becomes that size and
 * the trim threshold twice it. Node offers no mallopt, so this allocates one 16 MiB block and
 * drops it; the next garbage collection frees it, which leaves blocks below 16 MiB on the heap
 * and up to 32 MiB of free heap kept for reuse. With another allocator it is one short-lived
 * allocation and nothing else.
 */
const TRIGGER_BYTES = 16 * 1024 * 1024

let done = false

/** Once per process, as early as possible; later calls do nothing. */
export function keepFreedHeapMapped(): void {
  if (done) return
  done = true
  // Its own malloc'd block (not a slice of Node's buffer pool), unreferenced at once.
  Buffer.allocUnsafeSlow(TRIGGER_BYTES)
}
