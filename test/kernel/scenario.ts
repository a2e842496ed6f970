/**
 * A small scenario language run both in blocksnap (over image files) and in the kernel (as a
 * generated dmsetup/dd shell script over the same kind of files attached as virtio disks), so
 * both produce results under the same keys:
 *
 *   <scenario>.<tag>.sha.<view>      sha256 of the whole view (view "o" is the origin)
 *   <scenario>.<tag>.status.<view>   the dmsetup status line
 *   <scenario>.merge.<snap>          status line of the merge target when the merge finished
 *   <scenario>.werr.<n>              "EIO" when the n-th write of the scenario failed
 *
 * Every snapshot's COW is a fixed-size file (zeroed for a new snapshot, or holding a COW made
 * earlier); `snap` attaches it, which in the kernel means "suspend origin, create, resume".
 * Writes take their bytes from one shared data image (a disk in the VM).
 */
import { createHash } from 'node:crypto'
import { FileDevice } from '../../src/device/file-device.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import { Snapshot } from '../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../src/store/persistent-store.js'
import { startMerge } from '../../src/merge/merge.js'
import type { Random } from '../support/random.js'

export const SECTOR = 512

export interface WriteOp {
  readonly op: 'write'
  /** 'o' for the origin (or the merge device), else a snapshot name. */
  readonly target: string
  readonly devOff: number
  readonly len: number
  readonly dataOff: number
}

export type Op =
  | { readonly op: 'snap'; readonly name: string; readonly chunkSectors: number; readonly store: 'P' | 'PO' }
  | WriteOp
  | { readonly op: 'check'; readonly tag: string }
  | { readonly op: 'merge'; readonly name: string; readonly during: readonly WriteOp[] }

export interface Scenario {
  readonly name: string
  readonly sizeBytes: number
  readonly ops: readonly Op[]
}

export interface ScenarioFiles {
  readonly origin: string
  /** COW file per snapshot name (fixed size). */
  readonly cows: ReadonlyMap<string, string>
}

export type Results = Map<string, string>

function hex(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex')
}

/** sha256 of the whole view, or "EIO" when it cannot be read (an invalid snapshot). */
async function hashView(dev: { read(off: number, len: number): Promise<Uint8Array> }, size: number): Promise<string> {
  const h = createHash('sha256')
  const piece = 1024 * 1024
  try {
    for (let off = 0; off < size; off += piece) h.update(await dev.read(off, Math.min(piece, size - off)))
  } catch {
    return 'EIO'
  }
  return h.digest('hex')
}

/** Runs the scenario in blocksnap over the files (modified in place). */
export async function runInBlocksnap(scn: Scenario, files: ScenarioFiles, data: Uint8Array): Promise<Results> {
  const results: Results = new Map()
  const sectors = scn.sizeBytes / SECTOR
  const origin = new Origin(await FileDevice.open(files.origin), { events: new ExceptionEvents() })
  const snaps = new Map<string, Snapshot>()
  let writes = 0
  const write = async (w: WriteOp): Promise<void> => {
    const n = writes++
    const dev = w.target === 'o' ? origin : (snaps.get(w.target) as Snapshot)
    if (!dev) throw new Error(`${scn.name}: write to unknown ${w.target}`)
    try {
      await dev.write(data.subarray(w.dataOff, w.dataOff + w.len), w.devOff)
      await dev.flush()
    } catch {
      // An invalid snapshot, or a full PO snapshot: the kernel fails the write too.
      results.set(`${scn.name}.werr.${n}`, 'EIO')
    }
  }
  try {
    for (const op of scn.ops) {
      if (op.op === 'snap') {
        const path = files.cows.get(op.name)
        if (!path) throw new Error(`${scn.name}: no COW file for ${op.name}`)
        const cow = await FileDevice.open(path)
        const snap = new Snapshot({
          name: op.name,
          store: new PersistentStore(cow, { chunkBytes: op.chunkSectors * SECTOR }),
          overflow: op.store === 'PO',
        })
        await origin.addSnapshot(snap)
        snaps.set(op.name, snap)
      } else if (op.op === 'write') {
        await write(op)
      } else if (op.op === 'check') {
        const p = `${scn.name}.${op.tag}`
        results.set(`${p}.sha.o`, await hashView(origin, scn.sizeBytes))
        for (const [name, snap] of snaps) {
          results.set(`${p}.sha.${name}`, await hashView(snap, scn.sizeBytes))
          results.set(`${p}.status.${name}`, `0 ${sectors} snapshot ${snap.statusText()}`)
        }
      } else {
        const snap = snaps.get(op.name) as Snapshot
        const merge = await startMerge(origin, snap)
        for (const w of op.during) await write(w)
        await merge.done
        results.set(`${scn.name}.merge.${op.name}`, `0 ${sectors} snapshot-merge ${snap.statusText()}`)
        snaps.delete(op.name)
      }
    }
  } finally {
    await origin.close()
  }
  return results
}

export interface KernelDisks {
  readonly origin: string
  readonly cows: ReadonlyMap<string, string>
  readonly data: string
}

/** The scenario as a shell script for the VM (device names like vda). */
export function kernelScript(scn: Scenario, disks: KernelDisks): string {
  const sectors = scn.sizeBytes / SECTOR
  const real = `${scn.name}-real`
  const o = `${scn.name}-o`
  const dev = (name: string): string => `${scn.name}-${name}`
  const lines: string[] = [`# scenario ${scn.name}`, `mk ${real} 0 ${sectors} linear /dev/${disks.origin} 0`, `mk ${o} 0 ${sectors} snapshot-origin /dev/mapper/${real}`]
  const active: string[] = []
  const specs = new Map<string, { chunkSectors: number; store: string }>()
  let writes = 0
  const write = (w: WriteOp): string => {
    const target = w.target === 'o' ? o : dev(w.target)
    return `wr ${target} ${disks.data} ${w.dataOff} ${w.len} ${w.devOff} ${scn.name}.werr.${writes++}`
  }
  for (const op of scn.ops) {
    if (op.op === 'snap') {
      const cow = disks.cows.get(op.name)
      specs.set(op.name, op)
      lines.push(`dmsetup suspend ${o}`, `mk ${dev(op.name)} 0 ${sectors} snapshot /dev/mapper/${real} /dev/${cow} ${op.store} ${op.chunkSectors}`, `dmsetup resume ${o}`)
      active.push(op.name)
    } else if (op.op === 'write') {
      lines.push(write(op))
    } else if (op.op === 'check') {
      const p = `${scn.name}.${op.tag}`
      lines.push(`hv ${p}.sha.o ${o}`)
      for (const name of active) {
        lines.push(`hv ${p}.sha.${name} ${dev(name)}`)
        lines.push(`R ${p}.status.${name} "$(dmsetup status ${dev(name)})"`)
      }
    } else {
      const spec = specs.get(op.name) as { chunkSectors: number; store: string }
      const cow = disks.cows.get(op.name)
      lines.push(
        `dmsetup suspend ${o}`,
        `dmsetup remove ${dev(op.name)}`,
        `reload ${o} 0 ${sectors} snapshot-merge /dev/mapper/${real} /dev/${cow} ${spec.store} ${spec.chunkSectors}`,
        `dmsetup resume ${o}`,
        ...op.during.map(write),
        `waitmerge ${o}`,
        `R ${scn.name}.merge.${op.name} "$(dmsetup status ${o})"`,
        `dmsetup suspend ${o}`,
        `reload ${o} 0 ${sectors} snapshot-origin /dev/mapper/${real}`,
        `dmsetup resume ${o}`,
      )
      active.splice(active.indexOf(op.name), 1)
    }
  }
  // Tear down: snapshots first, then the origin and the linear device; flush everything.
  for (const name of active) lines.push(`dmsetup remove ${dev(name)}`)
  lines.push(`dmsetup remove ${o}`, `dmsetup remove ${real}`, 'sync')
  return lines.join('\n') + '\n'
}

/**
 * Page-aligned random writes of 4 KiB..maxLen bytes. Page-aligned because writes in the VM go
 * through the block device's page cache even with `dd oflag=direct` (observed on 6.1: a 1 KiB
 * direct write to snapshot-origin or to a snapshot creates 8 exceptions of 512-byte chunks, and
 * an unaligned "direct" write succeeds), so a sub-page write reaches dm-snapshot as a whole-page
 * read-modify-write. With page-aligned writes both sides see the same writes.
 */
export function randomWrites(random: Random, target: string, count: number, maxLen: number, sizeBytes: number, dataBytes: number, align = 4096): WriteOp[] {
  const out: WriteOp[] = []
  for (let i = 0; i < count; i++) {
    const len = (1 + random.int(maxLen / align)) * align
    const devOff = random.int(Math.floor((sizeBytes - len) / align) + 1) * align
    const dataOff = random.int(Math.floor((dataBytes - len) / SECTOR) + 1) * SECTOR
    out.push({ op: 'write', target, devOff, len, dataOff })
  }
  return out
}

/** One big write, split in pieces of at most `piece` bytes (dd with bs above 1 MiB is slow to set up). */
export function bigWrite(target: string, devOff: number, len: number, dataOff: number, piece = 1024 * 1024): WriteOp[] {
  const out: WriteOp[] = []
  for (let done = 0; done < len; done += piece) out.push({ op: 'write', target, devOff: devOff + done, len: Math.min(piece, len - done), dataOff: dataOff + done })
  return out
}

export { hex as sha256hex }
