/**
 * A growable list of decoded exception entries (old chunk, new chunk) in table order, held in
 * typed arrays so opening a COW with 10^7..10^8 exceptions costs 8 bytes per entry and no object
 * or closure call per entry.
 *
 * Chunk numbers are stored as 32-bit low words; the high words (the format allows up to 2^53)
 * get their own arrays only once some entry needs them, so the common case stays at 8 bytes.
 */
const TWO32 = 4294967296
const INITIAL = 1024

export class ExceptionList {
  /** Entries in use; entries at and after `count` are garbage. */
  count = 0
  oldLo: Uint32Array = new Uint32Array(INITIAL)
  newLo: Uint32Array = new Uint32Array(INITIAL)
  /** High 32 bits of old chunks, null while every old chunk is below 2^32. */
  oldHi: Uint32Array | null = null
  /** High 32 bits of new chunks, null while every new chunk is below 2^32. */
  newHi: Uint32Array | null = null

  /** Makes room for `more` entries after `count`. */
  reserve(more: number): void {
    const need = this.count + more
    if (need <= this.oldLo.length) return
    // 1.5x keeps the transient copy small for 10^8 entries while still amortising growth
    const cap = Math.max(need, Math.ceil(this.oldLo.length * 1.5))
    this.oldLo = grown(this.oldLo, cap)
    this.newLo = grown(this.newLo, cap)
    if (this.oldHi) this.oldHi = grown(this.oldHi, cap)
    if (this.newHi) this.newHi = grown(this.newHi, cap)
  }

  /** Appends one entry given as 32-bit halves (after reserve). */
  pushWords(oldLo: number, oldHi: number, newLo: number, newHi: number): void {
    const i = this.count++
    this.oldLo[i] = oldLo
    this.newLo[i] = newLo
    if (oldHi !== 0) (this.oldHi ??= new Uint32Array(this.oldLo.length))[i] = oldHi
    else if (this.oldHi) this.oldHi[i] = 0
    if (newHi !== 0) (this.newHi ??= new Uint32Array(this.newLo.length))[i] = newHi
    else if (this.newHi) this.newHi[i] = 0
  }

  /** Appends one entry (any safe integers). */
  push(oldChunk: number, newChunk: number): void {
    this.reserve(1)
    const oHi = Math.floor(oldChunk / TWO32)
    const nHi = Math.floor(newChunk / TWO32)
    this.pushWords(oldChunk - oHi * TWO32, oHi, newChunk - nHi * TWO32, nHi)
  }

  oldAt(i: number): number {
    return (this.oldHi ? this.oldHi[i]! * TWO32 : 0) + this.oldLo[i]!
  }

  newAt(i: number): number {
    return (this.newHi ? this.newHi[i]! * TWO32 : 0) + this.newLo[i]!
  }

  /** True when every old and new chunk fits in 32 bits (only the Lo arrays matter). */
  get allBelow2To32(): boolean {
    return this.oldHi === null && this.newHi === null
  }
}

function grown(a: Uint32Array, cap: number): Uint32Array {
  const b = new Uint32Array(cap)
  b.set(a)
  return b
}
