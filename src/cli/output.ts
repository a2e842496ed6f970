/** Human-readable renderings for the CLI (JSON output is the VolumeInfo object itself). */
import type { VolumeInfo } from '../volume/volume.js'

function human(bytes: number): string {
  const units = ['B', 'K', 'M', 'G', 'T']
  let v = bytes
  let u = 0
  while (v >= 1024 && u < units.length - 1 && v % 1024 === 0) {
    v /= 1024
    u++
  }
  if (v >= 1024 && u < units.length - 1) {
    while (v >= 1024 && u < units.length - 1) {
      v /= 1024
      u++
    }
    return `${v.toFixed(2)}${units[u]}`
  }
  return `${v}${units[u]}`
}

/**
 * An `lvs`-like table: name, chunk, store, data % (the COW's fill, as lvs), origin % (share of the
 * origin's chunks copied), COW size, state.
 */
export function formatList(info: VolumeInfo): string {
  const rows = [['NAME', 'CHUNK', 'STORE', 'DATA%', 'ORIGIN%', 'COW', 'STATE']]
  rows.push([info.name, '-', 'origin', '-', '-', human(info.sizeBytes), info.merge ? `merging ${info.merge.snapshot}` : 'active'])
  for (const s of info.snapshots) {
    const store = s.store === 'persistent' ? (s.overflow ? 'PO' : 'P') : 'N'
    rows.push([`${info.name}@${s.name}`, human(s.chunkSizeBytes), store, s.dataPercent.toFixed(2), s.originPercent.toFixed(2), human(s.cowSizeBytes), s.state])
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)))
  return `${rows.map((r) => r.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd()).join('\n')}\n`
}
