/**
 * Load-independent cost of the engine's JavaScript work: promises allocated and CPU time per MiB
 * of first-touch writes, snapshot reads and merges, over memory devices (no I/O wait, so the
 * figures measure the engine itself, not the disk or the machine's load).
 *
 *   npx tsx bench/extent-cost.ts [--mib 32]
 *
 * Promises are counted with an async_hooks `init` hook (type PROMISE) in one pass; CPU time
 * (process.cpuUsage, user + system) is taken in a second pass without the hook, which would
 * otherwise dominate it. Each case builds a fresh origin and snapshots.
 */
import { createHook } from 'node:async_hooks'
import { MemoryDevice } from '../src/device/memory-device.js'
import { startMerge } from '../src/merge/merge.js'
import { ExceptionEvents } from '../src/snapshot/exception-events.js'
import { Origin } from '../src/snapshot/origin.js'
import { Snapshot } from '../src/snapshot/snapshot.js'
import { PersistentStore } from '../src/store/persistent-store.js'

const MiB = 1024 * 1024
const KiB = 1024

function parseMib(argv: string[]): number {
  const k = argv.indexOf('--mib')
  if (k < 0) return 32
  const v = Number(argv[k + 1])
  if (!Number.isInteger(v) || v <= 0) throw new Error(`--mib needs a positive integer, got ${argv[k + 1]}`)
  return v
}

const MIB = parseMib(process.argv)
const ORIGIN_BYTES = MIB * MiB

interface Setup {
  readonly origin: Origin
  readonly snapshots: Snapshot[]
}

async function setup(snapshotCount: number, chunkBytes = 4 * KiB): Promise<Setup> {
  const origin = new Origin(new MemoryDevice(ORIGIN_BYTES), { events: new ExceptionEvents() })
  const snapshots: Snapshot[] = []
  for (let i = 0; i < snapshotCount; i++) {
    // Room for every chunk plus its metadata areas.
    const cow = new MemoryDevice(ORIGIN_BYTES * 2 + 16 * MiB)
    const snap = new Snapshot({ name: `s${i}`, store: new PersistentStore(cow, { chunkBytes }) })
    await origin.addSnapshot(snap)
    snapshots.push(snap)
  }
  return { origin, snapshots }
}

/** Runs `count` writes of `bytes` at the offsets `at(i)`, `depth` at a time. */
async function writes(origin: Origin, bytes: number, count: number, depth: number, at: (i: number) => number): Promise<void> {
  const data = new Uint8Array(bytes).fill(0x5a)
  let next = 0
  const worker = async () => {
    while (next < count) {
      const i = next++
      await origin.write(data, at(i))
    }
  }
  await Promise.all(Array.from({ length: depth }, worker))
  await origin.flush()
}

/** A permutation of 0..n-1 (deterministic), so random writes touch every chunk once. */
function permutation(n: number): number[] {
  const order = Array.from({ length: n }, (_, i) => i)
  let state = 12345
  for (let i = n - 1; i > 0; i--) {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0
    const j = state % (i + 1)
    ;[order[i], order[j]] = [order[j] as number, order[i] as number]
  }
  return order
}

interface Case {
  readonly name: string
  /** Builds the state; not measured. */
  prepare(): Promise<unknown>
  /** The measured work over MIB MiB. */
  run(state: unknown): Promise<void>
  done(state: unknown): Promise<void>
}

const closeAll = async (state: unknown) => (state as Setup).origin.close()

function firstTouch(name: string, snapshots: number, bytes: number, depth: number, random: boolean): Case {
  const count = ORIGIN_BYTES / bytes
  const order = random ? permutation(count) : null
  return {
    name,
    prepare: () => setup(snapshots),
    run: (state) => writes((state as Setup).origin, bytes, count, depth, (i) => (order ? (order[i] as number) : i) * bytes),
    done: closeAll,
  }
}

const cases: Case[] = [
  firstTouch('first-touch 4K random QD32, one 4K-chunk snapshot', 1, 4 * KiB, 32, true),
  firstTouch('first-touch 1M sequential QD8, one 4K-chunk snapshot', 1, MiB, 8, false),
  firstTouch('first-touch 1M sequential QD8, four 4K-chunk snapshots', 4, MiB, 8, false),
  {
    name: 'snapshot 1M sequential reads, 25% of chunks in the COW',
    async prepare() {
      const s = await setup(1)
      // every fourth 16 KiB piece changed: runs of 4 saved chunks between 12 unsaved ones
      await writes(s.origin, 16 * KiB, ORIGIN_BYTES / (64 * KiB), 8, (i) => i * 64 * KiB)
      return s
    },
    async run(state) {
      const snap = (state as Setup).snapshots[0] as Snapshot
      const target = new Uint8Array(MiB)
      for (let at = 0; at < ORIGIN_BYTES; at += MiB) await snap.readInto(target, at)
    },
    done: closeAll,
  },
  {
    name: 'merge of sequential changes, 4K chunks',
    async prepare() {
      const s = await setup(1)
      await writes(s.origin, MiB, ORIGIN_BYTES / MiB, 8, (i) => i * MiB)
      return s
    },
    async run(state) {
      const s = state as Setup
      const merge = await startMerge(s.origin, s.snapshots[0] as Snapshot)
      await merge.done
    },
    async done(state) {
      await (state as Setup).origin.close()
    },
  },
]

async function measure(c: Case): Promise<{ promisesPerMiB: number; cpuMsPerMiB: number }> {
  let promises = 0
  const hook = createHook({
    init(_id, type) {
      if (type === 'PROMISE') promises++
    },
  })
  let state = await c.prepare()
  hook.enable()
  await c.run(state)
  hook.disable()
  await c.done(state)

  state = await c.prepare()
  const before = process.cpuUsage()
  await c.run(state)
  const used = process.cpuUsage(before)
  await c.done(state)
  return { promisesPerMiB: promises / MIB, cpuMsPerMiB: (used.user + used.system) / 1000 / MIB }
}

console.log(`engine cost per MiB over memory devices (${MIB} MiB per case)`)
for (const c of cases) {
  const r = await measure(c)
  console.log(`${c.name.padEnd(58)} promises/MiB ${r.promisesPerMiB.toFixed(0).padStart(7)}   cpu ms/MiB ${r.cpuMsPerMiB.toFixed(2).padStart(7)}`)
}
