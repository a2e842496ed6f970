/**
 * Power cuts: random traces of three kinds, each cut at many points of its write log and
 * reopened from the disks a cut could leave (unflushed writes dropped; a random subset kept with
 * the last one torn at a sector boundary):
 * - engine: write-through origin (writeBackBytes 0), snapshots of 512 B..64 KiB chunks, some
 *   taken part way, one sometimes with a COW that fills (invalidated, as in the kernel), origin
 *   and snapshot writes, some FUA;
 * - write-back: the same with answered-before-commit origin writes (small and large write-back
 *   limits), more FUA; answered writes may only be lost if no flush covered them;
 * - merge: a merge with other snapshots present, resumed after every cut.
 * Checks: test/support/engine-crash-trace.ts and merge-crash-case.ts.
 *
 * Trace t's kind is t mod 3; its cuts are drawn from its own seed, so case "t/cut" replays
 * exactly (the trace is recorded again, then that one cut is checked).
 */
import { checkEngineCut, chooseCuts, recordEngineTrace, type EngineTrace } from '../test/support/engine-crash-trace.js'
import type { SnapshotSpec, StoreKind } from '../test/support/engine-stack.js'
import { type CrashCase, checkMergeCut, recordMergeCase, type MergeTrace } from '../test/support/merge-crash-case.js'
import { Random, streamSeed } from '../test/support/random.js'
import { type Campaign, type CampaignResult, type CampaignSettings, describe, progress, withDeadline } from './harness.js'

const KiB = 1024
const CUTS_PER_TRACE = 100
const KINDS = ['engine', 'merge', 'write-back'] as const
type Kind = (typeof KINDS)[number]

type Trace = { kind: 'engine' | 'write-back'; engine: EngineTrace } | { kind: 'merge'; merge: MergeTrace }

function randomSpecs(random: Random, count: number, prefix: string, cowBytes: number): SnapshotSpec[] {
  const specs: SnapshotSpec[] = []
  for (let i = 0; i < count; i++) {
    const kind: StoreKind = random.chance(0.15) ? 'N' : random.chance(0.3) ? 'PO' : 'P'
    specs.push({ name: `${prefix}${i}`, kind, chunkBytes: random.pick([512, 1024, 4096, 4096, 16384, 65536]), cowBytes })
  }
  return specs
}

async function recordTrace(seed: number, index: number): Promise<Trace> {
  const kind: Kind = KINDS[index % 3] as Kind
  const traceSeed = streamSeed(seed, `power trace ${index}`)
  const random = new Random(streamSeed(traceSeed, 'shape'))
  if (kind === 'merge') {
    const originBytes = random.pick([64, 96, 256]) * KiB + random.pick([0, 512, 1536])
    // Other persistent snapshots (the merge relocates into them); at least one.
    const others = randomSpecs(random, 1 + random.int(3), 's', 4096 * KiB).map((s) => (s.kind === 'N' ? { ...s, kind: 'P' as const } : s))
    // Half the merged COWs grow on demand, so the merge truncates them as it goes (drawn from
    // a stream of its own: the shapes a seed always gave stay the same).
    const growable = new Random(streamSeed(traceSeed, 'growable')).chance(0.5)
    const m: SnapshotSpec = {
      name: 'm',
      kind: random.chance(0.3) ? 'PO' : 'P',
      chunkBytes: random.pick([512, 4096, 16384]),
      cowBytes: growable ? 64 * KiB : 4096 * KiB,
      ...(growable ? { growable } : {}),
    }
    const specs = [...others]
    specs.splice(random.int(specs.length + 1), 0, m)
    const c: CrashCase = {
      seed: traceSeed % 1_000_000,
      originBytes,
      specs,
      originWrites: random.int(Math.floor(originBytes / (4 * KiB)) + 1),
      cutStride: 1,
      ...(random.chance(0.5) ? { maxStepChunks: 1 + random.int(40) } : {}),
    }
    return { kind, merge: await recordMergeCase(c) }
  }
  const originBytes = random.pick([32, 64, 96]) * KiB + random.pick([0, 512, 1536])
  const specs = randomSpecs(random, 1 + random.int(3), 'a', 2048 * KiB)
  const laterSpecs = randomSpecs(random, random.int(3), 'b', 2048 * KiB)
  // A COW with room for a few chunks only: it fills during the trace and is invalidated.
  if (random.chance(0.3)) laterSpecs.push({ name: 'tiny', kind: random.chance(0.5) ? 'PO' : 'P', chunkBytes: 4096, cowBytes: (6 + random.int(8)) * 4096 })
  const engine = await recordEngineTrace({
    seed: traceSeed,
    originBytes,
    specs,
    laterSpecs,
    steps: 10 + random.int(20),
    writeBackBytes: kind === 'engine' ? 0 : random.pick([4 * KiB, 32 * KiB, 16 * 1024 * KiB]),
    fuaChance: kind === 'engine' ? 0.1 : 0.25,
    syncChance: 0.25,
  })
  return { kind, engine }
}

function cutsOf(trace: Trace, seed: number, index: number): number[] {
  const random = new Random(streamSeed(seed, `power cuts ${index}`))
  const recorder = trace.kind === 'merge' ? trace.merge.recorder : trace.engine.recorder
  return chooseCuts({ recorder }, CUTS_PER_TRACE, random)
}

/** Checks one cut in both crash modes. */
async function checkCut(trace: Trace, cut: number): Promise<void> {
  if (trace.kind === 'merge') {
    await checkMergeCut(trace.merge, cut, 'drop')
    await checkMergeCut(trace.merge, cut, 'random')
    return
  }
  await checkEngineCut(trace.engine, cut, { unflushed: 'drop' }, `${trace.kind} cut ${cut} drop`)
  await checkEngineCut(trace.engine, cut, { unflushed: 'random', seed: cut, tear: true }, `${trace.kind} cut ${cut} random+tear`)
}

const message = (err: unknown) => (err instanceof Error && err.name === 'AssertionError' ? err.message.split('\n')[0] as string : describe(err))

export const powerCutCampaign: Campaign = {
  name: 'power-cuts',
  unit: 'power-cut points',
  async run(settings: CampaignSettings): Promise<CampaignResult> {
    const counts: Record<string, number> = { traces: 0, 'cut points': 0, 'crash images reopened': 0, 'engine cuts': 0, 'merge cuts': 0, 'write-back cuts': 0 }
    const tick = progress('power-cuts')
    let failures = 0
    let stoppedByTime = false
    for (let t = 0; counts['cut points']! < settings.count; t++) {
      if (Date.now() > settings.stopAt) {
        stoppedByTime = true
        break
      }
      let trace: Trace
      try {
        trace = await withDeadline(recordTrace(settings.seed, t), settings.deadlineMs, `recording trace ${t}`)
      } catch (err) {
        failures++
        settings.onFailure({ campaign: 'power-cuts', caseId: `${t}/0`, message: `recording trace ${t} (${KINDS[t % 3]}): ${message(err)}` })
        continue
      }
      counts.traces!++
      const cuts = cutsOf(trace, settings.seed, t).slice(0, settings.count - counts['cut points']!)
      for (const cut of cuts) {
        if (Date.now() > settings.stopAt) {
          stoppedByTime = true
          break
        }
        try {
          await withDeadline(checkCut(trace, cut), settings.deadlineMs, `trace ${t} cut ${cut}`)
        } catch (err) {
          failures++
          settings.onFailure({ campaign: 'power-cuts', caseId: `${t}/${cut}`, message: `${trace.kind} trace ${t}: ${message(err)}` })
        }
        counts['cut points']!++
        counts['crash images reopened']! += 2
        counts[`${trace.kind} cuts`]!++
        tick(counts['cut points']!, settings.count)
      }
    }
    return { counts, done: counts['cut points']!, failures, stoppedByTime }
  },
  async replay(seed, caseId, deadlineMs) {
    const m = /^(\d+)\/(\d+)$/.exec(caseId)
    if (!m) throw new Error(`power-cuts case ids look like TRACE/CUT, not ${caseId}`)
    const trace = await withDeadline(recordTrace(seed, Number(m[1])), deadlineMs, 'recording the trace')
    await withDeadline(checkCut(trace, Number(m[2])), deadlineMs, 'checking the cut')
  },
}
