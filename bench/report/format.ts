/** Number formatting and the median the floors table uses. */
export const median = (xs: readonly number[]): number => {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b)
  if (s.length === 0) return NaN
  const m = Math.floor(s.length / 2)
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2
}

export function fmt(x: number, digits = 2): string {
  return Number.isFinite(x) ? x.toFixed(digits) : 'n/a'
}

/** IOPS-style: 12.3k above 10 000. */
export function k(x: number): string {
  if (!Number.isFinite(x)) return 'n/a'
  return x >= 10000 ? `${(x / 1000).toFixed(1)}k` : String(Math.round(x))
}

/** "a 1 / 2 vs b 3 / 4 unit": one figure per round on each side. */
export function rawPairs(pairs: Array<[number, number]>, a: string, b: string, unit: string): string {
  return `${a} ${pairs.map((p) => k(p[0])).join(' / ')} vs ${b} ${pairs.map((p) => k(p[1])).join(' / ')} ${unit}`
}
