/**
 * Test helpers that assemble an origin with snapshots over memory devices (optionally wrapped
 * in FaultyDevice for random completion delays), and reopen it from the same bytes.
 */
import { MemoryDevice } from '../../src/device/memory-device.js'
import type { BlockDevice } from '../../src/device/block-device.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import { Snapshot } from '../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../src/store/persistent-store.js'
import { TransientStore } from '../../src/store/transient-store.js'
import { FaultyDevice } from './faulty-device.js'
import type { Random } from './random.js'

export type StoreKind = 'P' | 'PO' | 'N'

export interface SnapshotSpec {
  readonly name: string
  readonly kind: StoreKind
  readonly chunkBytes: number
  readonly cowBytes: number
}

export interface Stack {
  readonly origin: Origin
  readonly originBase: MemoryDevice
  readonly snapshots: Map<string, Snapshot>
  readonly cowBases: Map<string, MemoryDevice>
  readonly specs: Map<string, SnapshotSpec>
  readonly events: ExceptionEvents
}

export function wrap(base: MemoryDevice, random: Random | null, maxDelayMs = 2): BlockDevice {
  if (!random) return base
  const dev = new FaultyDevice(base)
  // Mostly short delays, with an occasional slow operation so that races between a slow read
  // and a whole copy-and-commit cycle really happen.
  dev.setDelay((op) => {
    if (op === 'read' && random.chance(0.03)) return 10 + random.int(10)
    return random.chance(0.5) ? 0 : random.int(maxDelayMs + 1)
  })
  return dev
}

export function makeSnapshot(spec: SnapshotSpec, cow: BlockDevice): Snapshot {
  const store =
    spec.kind === 'N'
      ? new TransientStore(cow, { chunkBytes: spec.chunkBytes })
      : new PersistentStore(cow, { chunkBytes: spec.chunkBytes })
  return new Snapshot({ name: spec.name, store, overflow: spec.kind === 'PO' })
}

export function newStack(originBase: MemoryDevice, random: Random | null): Stack {
  const events = new ExceptionEvents()
  return {
    origin: new Origin(wrap(originBase, random), { events }),
    originBase,
    snapshots: new Map(),
    cowBases: new Map(),
    specs: new Map(),
    events,
  }
}

export async function addSnapshot(stack: Stack, spec: SnapshotSpec, random: Random | null, cowBase?: MemoryDevice): Promise<Snapshot> {
  const base = cowBase ?? new MemoryDevice(spec.cowBytes)
  const snap = makeSnapshot(spec, wrap(base, random))
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
export async function reopen(stack: Stack, random: Random | null): Promise<{ stack: Stack; dropped: string[] }> {
  await stack.origin.flush()
  for (const s of stack.snapshots.values()) await s.flush()
  const originImage = stack.originBase.clone()
  const cowImages = new Map([...stack.cowBases].map(([name, base]) => [name, base.clone()]))
  await stack.origin.close()
  const next = newStack(originImage, random)
  const dropped: string[] = []
  for (const [name, spec] of stack.specs) {
    if (spec.kind === 'N') {
      dropped.push(name)
      continue
    }
    await addSnapshot(next, spec, random, cowImages.get(name))
  }
  return { stack: next, dropped }
}
