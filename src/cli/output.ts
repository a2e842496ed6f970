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
  const table = `${rows.map((r) => r.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd()).join('\n')}\n`
  const notes = info.snapshots.filter((s) => s.state === 'broken').map((s) => `${info.name}@${s.name}: broken: ${s.reason ?? 'unknown'}\n`)
  return notes.length === 0 ? table : `${table}\n${notes.join('')}origin writes and merges are refused until the broken snapshots are repaired or removed (remove --force)\n`
}

/**
 * Warning lines for `status`: the broken snapshot asked about, or for the origin every broken
 * snapshot (they are why its writes are refused). Empty when there is nothing to say.
 */
export function brokenWarnings(info: VolumeInfo, snapshot: string | null): string {
  return info.snapshots
    .filter((s) => s.state === 'broken' && (snapshot === null || s.name === snapshot))
    .map((s) => `blocksnap: warning: ${info.name}@${s.name} is broken: ${s.reason ?? 'unknown'}${snapshot === null ? '; origin writes are refused' : ''}\n`)
    .join('')
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
    if (s.state === 'invalid') lines.push(`blocksnap: warning: snapshot ${volume}@${s.name} is now invalid: ${s.reason ?? 'invalidated'}`)
    else if (s.state === 'overflow') lines.push(`blocksnap: warning: snapshot ${volume}@${s.name} has overflowed: COW full; writes to it are refused`)
  }
  return lines
}
