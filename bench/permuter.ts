/**
 * Bijection on k-bit integers (k <= 32): odd multiplies and xorshifts are each invertible, so
 * permuter(bits, salt)(i) for i < 2^bits visits every k-bit value once, in a scrambled order.
 * The benches use it for distinct random-looking chunk numbers without a set of seen values.
 */
export function permuter(bits: number, salt: number): (i: number) => number {
  const mod = 2 ** bits
  const half = Math.max(1, Math.floor(bits / 2))
  return (i: number) => {
    let x = (Math.imul(i ^ salt, 0x2545f491) >>> 0) % mod
    x = (x ^ (x >>> half)) >>> 0
    x = (Math.imul(x, 0x9e3779b1) >>> 0) % mod
    x = (x ^ (x >>> half)) >>> 0
    return x
  }
}
