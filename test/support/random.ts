/**
 * Seeded PRNG (mulberry32) so randomized tests replay exactly from a printed seed.
 * next() combines two 32-bit outputs to give 53 random bits, so int(n) stays fair for large n.
 */
export class Random {
  private state: number
  readonly seed: number

  constructor(seed: number) {
    this.seed = seed
    // Mix the seed so nearby seeds (1, 2, 3...) do not start on correlated streams.
    this.state = Math.imul((seed >>> 0) ^ 0x9e3779b9, 0x85ebca6b) >>> 0
  }

  private next32(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0
    let t = this.state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return (t ^ (t >>> 14)) >>> 0
  }

  /** Uniform in [0, 1). */
  next(): number {
    const high = this.next32() >>> 5 // 27 bits
    const low = this.next32() >>> 6 // 26 bits
    return (high * 67108864 + low) / 9007199254740992
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    if (!Number.isSafeInteger(n) || n <= 0) throw new RangeError(`Random.int: bad bound ${n}`)
    return Math.floor(this.next() * n)
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new RangeError('Random.pick: empty array')
    return items[this.int(items.length)] as T
  }

  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n)
    let i = 0
    for (; i + 4 <= n; i += 4) {
      const v = this.next32()
      out[i] = v & 0xff
      out[i + 1] = (v >>> 8) & 0xff
      out[i + 2] = (v >>> 16) & 0xff
      out[i + 3] = v >>> 24
    }
    for (; i < n; i++) out[i] = this.next32() & 0xff
    return out
  }

  chance(p: number): boolean {
    return this.next() < p
  }
}

/**
 * The seed of an independent stream named `stream` derived from `seed` (FNV-1a over both), so
 * one printed seed replays every stream of a test and no stream's draws shift another's.
 */
export function streamSeed(seed: number, stream: string): number {
  let h = Math.imul(0x811c9dc5 ^ (seed >>> 0), 0x01000193)
  for (let i = 0; i < stream.length; i++) h = Math.imul(h ^ stream.charCodeAt(i), 0x01000193)
  return h >>> 0
}
