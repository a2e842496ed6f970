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

/** An `lvs`-like table: name, chunk, store, data %, state. */
export function formatList(info: VolumeInfo): string {
  const rows = [['NAME', 'CHUNK', 'STORE', 'DATA%', 'COW', 'STATE']]
  rows.push([info.name, '-', 'origin', '-', human(info.sizeBytes), info.merge ? `merging ${info.merge.snapshot}` : 'active'])
  for (const s of info.snapshots) {
    const store = s.store === 'persistent' ? (s.overflow ? 'PO' : 'P') : 'N'
    // Data% of the origin size, as lvs shows for a snapshot's used exception space.
    const dataBytes = Math.max(0, s.allocatedBytes - s.metadataBytes)
    const pct = info.sizeBytes > 0 ? ((100 * dataBytes) / info.sizeBytes).toFixed(2) : '0.00'
    rows.push([`${info.name}@${s.name}`, human(s.chunkSizeBytes), store, pct, human(s.cowSizeBytes), s.state])
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)))
  return `${rows.map((r) => r.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd()).join('\n')}\n`
}

/**
 * Warning lines for snapshots a command broke as a side effect (a fixed-size COW that filled
 * up: the write succeeded, as in the kernel, but the snapshot is gone or refuses writes).
 */
export function snapshotWarnings(volume: string, before: VolumeInfo, after: VolumeInfo): string[] {
  const lines: string[] = []
  for (const s of after.snapshots) {
    const was = before.snapshots.find((b) => b.name === s.name)?.state
    if (was === undefined || was === s.state) continue
    if (s.state === 'invalid') lines.push(`blocksnap: warning: snapshot ${volume}@${s.name} is now invalid: ${s.invalidReason ?? 'invalidated'}`)
    else if (s.state === 'overflow') lines.push(`blocksnap: warning: snapshot ${volume}@${s.name} has overflowed: COW full; writes to it are refused`)
  }
  return lines
}
