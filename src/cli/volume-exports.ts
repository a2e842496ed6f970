/**
 * NBD exports of served volumes: `NAME` is the origin, `NAME@SNAP` each snapshot. Consulted at
 * every handshake, so snapshots appear and disappear as they are created, merged and removed.
 * Snapshots also offer the `blocksnap:exceptions` meta context: the extents they hold in their
 * COW, i.e. where they differ from the origin's current data (changed-block tracking). The
 * origin offers `qemu:dirty-bitmap:SNAP` for each snapshot SNAP: the chunks written on the origin
 * since SNAP, as qemu-nbd serves a persistent dirty bitmap (see volume/block-maps.ts). Every
 * export answers base:allocation from the volume's real allocation.
 */
import { SnapError } from '../errors.js'
import type { BlockStatusExtent, ExportProvider, NbdExport, RefusedExport } from '../nbd/export.js'
import { BaseAllocation } from '../protocol/nbd/constants.js'
import type { Snapshot } from '../snapshot/snapshot.js'
import { allocationExtents, dirtyExtents, dirtyMapRefusal } from '../volume/block-maps.js'
import type { Volume } from '../volume/volume.js'

export const EXCEPTIONS_CONTEXT = 'blocksnap:exceptions'
export const DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:'
/** qemu's dirty-bitmap context flag for a changed block. */
const DIRTY = 0x1

async function allocationStatus(v: Volume, snapshot: string | null, offset: number, length: number): Promise<BlockStatusExtent[]> {
  const end = Math.min(offset + length, v.sizeBytes)
  const extents = await allocationExtents(v, snapshot, offset, end - offset)
  return extents.map((e) => ({ length: e.length, flags: e.data ? 0 : BaseAllocation.HOLE | BaseAllocation.ZERO }))
}

function dirtyStatus(v: Volume, snap: Snapshot, offset: number, length: number): BlockStatusExtent[] {
  const end = Math.min(offset + length, v.sizeBytes)
  return dirtyExtents(v, snap, offset, end - offset).map((e) => ({ length: e.length, flags: e.dirty ? DIRTY : 0 }))
}

/**
 * The dirty maps the origin offers now, by context name. A connection keeps the snapshots it was
 * offered: one removed later (and maybe recreated under the same name) fails, never answers for
 * another snapshot.
 */
function dirtyBitmaps(v: Volume): Map<string, Snapshot> {
  const bitmaps = new Map<string, Snapshot>()
  for (const r of v.records) {
    if (v.broken(r.name) !== null) continue
    const snap = v.snapshot(r.name)
    if (dirtyMapRefusal(snap) === null) bitmaps.set(`${DIRTY_BITMAP_PREFIX}${r.name}`, snap)
  }
  return bitmaps
}

function snapshotExtents(snap: Snapshot, offset: number, length: number): BlockStatusExtent[] {
  const chunkBytes = snap.chunkBytes
  const end = Math.min(offset + length, snap.sizeBytes)
  const extents: BlockStatusExtent[] = []
  let pos = offset
  // Bounded work per request: the client asks again for the rest.
  for (let n = 0; pos < end && n < 100_000; n++) {
    const { inCow, endBytes: stop } = snap.changedExtentAt(pos, Math.min(end, (Math.floor(pos / chunkBytes) + 65536) * chunkBytes))
    const flags = inCow ? 1 : 0
    const last = extents[extents.length - 1]
    if (last && last.flags === flags) extents[extents.length - 1] = { length: last.length + (stop - pos), flags }
    else extents.push({ length: stop - pos, flags })
    pos = stop
  }
  return extents
}

export class VolumeExports implements ExportProvider {
  private readonly volumes: Volume[]
  private readonly readOnly: boolean

  constructor(volumes: Volume[], options: { readOnly?: boolean } = {}) {
    this.volumes = volumes
    this.readOnly = options.readOnly === true
  }

  list(): readonly NbdExport[] {
    const out: NbdExport[] = []
    for (const v of this.volumes) {
      out.push(this.originExport(v))
      for (const r of v.records) {
        const e = this.snapshotExport(v, r.name)
        if (e && !('refused' in e)) out.push(e)
      }
    }
    return out
  }

  get(name: string): NbdExport | RefusedExport | undefined {
    if (name === '') return this.list()[0]
    const at = name.lastIndexOf('@')
    const volName = at === -1 ? name : name.slice(0, at)
    const v = this.volumes.find((x) => x.name === volName)
    if (!v) return undefined
    if (at === -1) return this.originExport(v)
    return this.snapshotExport(v, name.slice(at + 1))
  }

  private originExport(v: Volume): NbdExport {
    const bitmaps = dirtyBitmaps(v)
    return {
      name: v.name,
      description: `blocksnap volume ${v.name} (origin)`,
      device: v.origin,
      readOnly: this.readOnly,
      fastZero: false,
      metaContexts: [...bitmaps.keys()],
      blockStatus: async (context, offset, length) => {
        if (context === BaseAllocation.CONTEXT) return allocationStatus(v, null, offset, length)
        const bitmap = bitmaps.get(context)
        if (bitmap) return dirtyStatus(v, bitmap, offset, length)
        // Chosen before the export was looked up again for GO: "clean" would be a lie.
        if (context.startsWith(DIRTY_BITMAP_PREFIX)) throw new SnapError('SNAP_INVALID', `dirty bitmap ${context} is no longer offered`)
        return [{ length, flags: 0 }]
      },
    }
  }

  private snapshotExport(v: Volume, snapName: string): NbdExport | RefusedExport | undefined {
    const broken = v.broken(snapName)
    if (broken !== null) return { refused: `snapshot ${snapName} of ${v.name} is broken: ${broken}` }
    let snap: Snapshot
    try {
      snap = v.snapshot(snapName)
    } catch {
      return undefined
    }
    if (snap.merging) return { refused: `snapshot ${snapName} is being merged into ${v.name}` }
    const name = `${v.name}@${snapName}`
    return {
      name,
      description: `blocksnap snapshot ${snapName} of ${v.name} (chunk ${snap.chunkBytes} bytes)`,
      device: snap,
      readOnly: this.readOnly,
      metaContexts: [EXCEPTIONS_CONTEXT],
      fastZero: false,
      blockStatus: async (context, offset, length) => {
        if (context === EXCEPTIONS_CONTEXT) return snapshotExtents(snap, offset, length)
        if (context === BaseAllocation.CONTEXT) return allocationStatus(v, snapName, offset, length)
        return [{ length, flags: 0 }]
      },
      // The Snapshot object is this export's identity: one removed (and maybe recreated under
      // the same name) or merged is gone for the clients that opened it.
      withdrawn: () => {
        if (!snap.active) return `export '${name}' is gone: the snapshot was ${snap.merging ? `merged into ${v.name}` : 'removed'}`
        if (snap.merging) return `export '${name}' is gone: the snapshot is being merged into ${v.name}`
        return null
      },
    }
  }
}
