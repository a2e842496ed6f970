/**
 * Stable LSD radix sort of 32-bit keys carrying their original positions, for bulk loads of
 * 10^7..10^8 entries where a comparison sort (or Array#sort on objects) costs seconds.
 *
 * Digits are at most 11 bits (a 2048-entry histogram stays in L1) and only as many passes run as
 * the largest key needs: keys below 2^25 take three passes of 9 bits.
 */
const MAX_DIGIT_BITS = 11

export interface SortedKeys {
  /** keys[0..count) in ascending order (equal keys keep their input order). */
  readonly keys: Uint32Array
  /** The value travelling with keys[i]: its input position, or payload[position] if given. */
  readonly index: Uint32Array
}

/**
 * Sorts keys[0..count). `keys` is used as scratch and its contents are lost: the result may be
 * `keys` itself or a new array, so use only what is returned. With `payload` (left intact), its
 * values travel with the keys instead of the positions: moving them along costs less than
 * gathering payload[index[i]] at random afterwards.
 */
export function radixSortWithIndex(keys: Uint32Array, count: number, payload: Uint32Array | null = null): SortedKeys {
  let max = 0
  for (let i = 0; i < count; i++) if (keys[i]! > max) max = keys[i]!
  const bits = 32 - Math.clz32(max)
  const passes = Math.max(1, Math.ceil(bits / MAX_DIGIT_BITS))
  const digitBits = Math.max(1, Math.ceil(bits / passes))
  const buckets = 1 << digitBits
  const mask = buckets - 1
  let srcKeys: Uint32Array = keys
  let dstKeys: Uint32Array = new Uint32Array(count)
  let srcIndex: Uint32Array | null = payload // null: identity before the first pass
  let dstIndex: Uint32Array = new Uint32Array(count)
  // the array the second pass writes into; never the caller's payload
  let spareIndex: Uint32Array | null = payload === null ? null : new Uint32Array(count)
  const counts = new Uint32Array(buckets)
  for (let p = 0, shift = 0; p < passes; p++, shift += digitBits) {
    counts.fill(0)
    for (let i = 0; i < count; i++) counts[(srcKeys[i]! >>> shift) & mask]!++
    let sum = 0
    for (let b = 0; b < buckets; b++) {
      const c = counts[b]!
      counts[b] = sum
      sum += c
    }
    if (srcIndex === null) {
      for (let i = 0; i < count; i++) {
        const k = srcKeys[i]!
        const at = counts[(k >>> shift) & mask]!++
        dstKeys[at] = k
        dstIndex[at] = i
      }
      spareIndex = new Uint32Array(count)
    } else {
      for (let i = 0; i < count; i++) {
        const k = srcKeys[i]!
        const at = counts[(k >>> shift) & mask]!++
        dstKeys[at] = k
        dstIndex[at] = srcIndex[i]!
      }
    }
    const k = srcKeys
    srcKeys = dstKeys
    dstKeys = k
    const ix: Uint32Array = p === 0 ? (spareIndex as Uint32Array) : (srcIndex as Uint32Array)
    srcIndex = dstIndex
    dstIndex = ix
  }
  return { keys: srcKeys, index: srcIndex as Uint32Array }
}
