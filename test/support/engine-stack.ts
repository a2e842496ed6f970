/**
 * Test helpers that assemble an origin with snapshots over memory devices (optionally wrapped
 * in FaultyDevice, with one Scheduler deciding the completion order of every device's
 * operations), and reopen it from the same bytes.
 */
import { MemoryDevice } from '../../src/device/memory-device.js'
import type { BlockDevice } from '../../src/device/block-device.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import { Snapshot } from '../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../src/store/persistent-store.js'
import { TransientStore } from '../../src/store/transient-store.js'
import { FaultyDevice } from './faulty-device.js'
import type { Scheduler } from './scheduler.js'

export type StoreKind = 'P' | 'PO' | 'N'

export interface SnapshotSpec {
  readonly name: string
  readonly kind: StoreKind
  readonly chunkBytes: number
  readonly cowBytes: number
  /**
   * A grow-on-demand COW that a merge shrinks as it frees it (a volume's own COW file);
   * cowBytes is then only its starting size.
   */
  readonly growable?: boolean
}

export interface Stack {
  readonly origin: Origin
  readonly originBase: MemoryDevice
  readonly snapshots: Map<string, Snapshot>
  readonly cowBases: Map<string, MemoryDevice>
  readonly specs: Map<string, SnapshotSpec>
  readonly events: ExceptionEvents
}

/** `base` with its operations completing when `scheduler` releases them (as is without one). */
export function wrap(base: BlockDevice, scheduler: Scheduler | null, name: string): BlockDevice {
  if (!scheduler) return base
  const dev = new FaultyDevice(base, name)
  dev.setGate(scheduler)
  return dev
}

export function makeSnapshot(spec: SnapshotSpec, cow: BlockDevice): Snapshot {
  const store =
    spec.kind === 'N'
      ? new TransientStore(cow, { chunkBytes: spec.chunkBytes })
      : new PersistentStore(cow, { chunkBytes: spec.chunkBytes, growable: spec.growable, releaseMergedSpace: spec.growable })
  return new Snapshot({ name: spec.name, store, overflow: spec.kind === 'PO' })
}

export function newStack(originBase: MemoryDevice, scheduler: Scheduler | null): Stack {
  const events = new ExceptionEvents()
  return {
    origin: new Origin(wrap(originBase, scheduler, 'origin'), { events }),
    originBase,
    snapshots: new Map(),
    cowBases: new Map(),
    specs: new Map(),
    events,
  }
}

export async function addSnapshot(stack: Stack, spec: SnapshotSpec, scheduler: Scheduler | null, cowBase?: MemoryDevice): Promise<Snapshot> {
  const base = cowBase ?? new MemoryDevice(spec.cowBytes)
  const snap = makeSnapshot(spec, wrap(base, scheduler, spec.name))
  await stack.origin.addSnapshot(snap)
  stack.snapshots.set(spec.name, snap)
  stack.cowBases.set(spec.name, base)
  stack.specs.set(spec.name, spec)
  return snap
}

/**
 * Closes the stack and opens a new one over copies of the same bytes. Transient snapshots do
 * not survive (their names are returned as dropped).
 */
export async function reopen(stack: Stack, scheduler: Scheduler | null): Promise<{ stack: Stack; dropped: string[] }> {
  await stack.origin.flush()
  for (const s of stack.snapshots.values()) await s.flush()
  const originImage = stack.originBase.clone()
  const cowImages = new Map([...stack.cowBases].map(([name, base]) => [name, base.clone()]))
  await stack.origin.close()
  const next = newStack(originImage, scheduler)
  const dropped: string[] = []
  for (const [name, spec] of stack.specs) {
    if (spec.kind === 'N') {
      dropped.push(name)
      continue
    }
    await addSnapshot(next, spec, scheduler, cowImages.get(name))
  }
  return { stack: next, dropped }
}
