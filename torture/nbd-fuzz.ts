/**
 * NBD client stream fuzzing: plausible sessions (nbd-streams.ts), damaged or not, are sent to an
 * in-process NbdServer over a Unix socket; the client half-closes after sending and reads until
 * the server closes. Per stream:
 * - no crash (no uncaught exception, no log line that is a stack trace or an internal error);
 * - no hang: the server closes within the deadline (a hang detector, not a verdict);
 * - the server's bytes are well-formed for what the client sent (readSession's violations);
 * - the device model: every byte the export's device changed lies in a WRITE, WRITE_ZEROES or
 *   TRIM the client sent in transmission, and holds that request's value; an acknowledged WRITE
 *   is on the device wherever no other write-type request overlaps it; a successful READ
 *   returned the device's initial bytes wherever no write-type request overlaps it; the
 *   read-only export never changes.
 *
 * Streams run on a few lanes at once (one server per lane), each stream on fresh devices, so a
 * case's outcome depends on its own bytes only.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import net from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { MemoryDevice } from '../src/device/memory-device.js'
import type { NbdExport } from '../src/nbd/export.js'
import { NbdServer } from '../src/nbd/server.js'
import { recordingLogger } from '../test/support/nbd-test-server.js'
import { Random, streamSeed } from '../test/support/random.js'
import { type Campaign, type CampaignResult, type CampaignSettings, describe, progress, withDeadline } from './harness.js'
import { CMD, type Session, type WireRequest, buildStream, mutate, readSession } from './nbd-streams.js'

const MEM_BYTES = 128 * 1024
const RO_BYTES = 64 * 1024
const LANES = 4
const SIZES = new Map([
  ['mem', MEM_BYTES],
  ['ro', RO_BYTES],
])

function pattern(length: number, salt: number): Uint8Array {
  const out = new Uint8Array(length)
  for (let i = 0; i < length; i++) out[i] = (i * 31 + salt + (i >>> 9)) & 0xff
  return out
}
const MEM_INITIAL = pattern(MEM_BYTES, 7)
const RO_INITIAL = pattern(RO_BYTES, 99)

interface Lane {
  readonly server: NbdServer
  readonly path: string
  readonly logs: string[]
  current: { mem: MemoryDevice; ro: MemoryDevice } | null
}

async function openLane(dir: string, index: number): Promise<Lane> {
  const logs: string[] = []
  const path = join(dir, `lane${index}.sock`)
  const lane: Lane = {
    path,
    logs,
    current: null,
    server: new NbdServer({
      exports: {
        list: () => exportsOf(lane),
        get: (name) => exportsOf(lane).find((e) => e.name === name),
      },
      logger: recordingLogger(logs, false),
      limits: { maxInFlightRequests: 4, maxInFlightBytes: 256 * 1024 },
    }),
  }
  await lane.server.listen({ path })
  return lane
}

function exportsOf(lane: Lane): NbdExport[] {
  if (!lane.current) return []
  return [
    { name: 'mem', device: lane.current.mem, readOnly: false, metaContexts: ['blocksnap:exceptions'] },
    { name: 'ro', device: lane.current.ro, readOnly: true },
  ]
}

/** Sends `bytes`, half-closes, and collects everything the server sends until it closes. */
function converse(path: string, bytes: Buffer): Promise<Buffer> {
  return new Promise((resolve) => {
    const received: Buffer[] = []
    const socket = net.connect(path)
    socket.on('data', (chunk: Buffer) => received.push(chunk))
    socket.on('error', () => {}) // EPIPE/ECONNRESET when the server hangs up first
    socket.on('close', () => resolve(Buffer.concat(received)))
    socket.on('connect', () => socket.end(bytes))
  })
}

/** The device checks; returns problems found. */
function checkDevices(session: Session, mem: Uint8Array, ro: Uint8Array): string[] {
  const problems: string[] = []
  const diff = ro.findIndex((b, i) => b !== RO_INITIAL[i])
  if (diff !== -1) problems.push(`read-only export changed at byte ${diff}`)
  const writers = session.possibleWriters.filter((w) => w.exportName === 'mem').map((w) => w.request)
  for (let i = 0; i < MEM_BYTES; i++) {
    if (mem[i] === MEM_INITIAL[i]) continue
    const explained = writers.some((r) => {
      if (i < r.offset || i >= r.offset + r.length) return false
      if (r.type === CMD.WRITE) return r.payload !== null && r.payload[i - r.offset] === mem[i]
      return mem[i] === 0
    })
    if (!explained) {
      problems.push(`mem byte ${i} changed to ${mem[i]} with no request that writes that`)
      break
    }
  }
  if (session.exportName !== 'mem' && session.exportName !== 'ro') return problems
  const device = session.exportName === 'mem' ? mem : ro
  const initial = session.exportName === 'mem' ? MEM_INITIAL : RO_INITIAL
  const overlaps = (r: WireRequest, i: number) => writers.some((w) => w !== r && i >= w.offset && i < w.offset + w.length)
  for (const w of session.ackedWrites) {
    for (let i = w.offset; i < w.offset + w.length && i < device.length; i++) {
      if (!overlaps(w, i) && device[i] !== (w.payload as Buffer)[i - w.offset]) {
        problems.push(`acknowledged WRITE ${w.length}@${w.offset} is not on the device at byte ${i}`)
        break
      }
    }
  }
  for (const { request, data } of session.reads) {
    for (let i = 0; i < request.length; i++) {
      const at = request.offset + i
      if (at >= device.length) {
        problems.push(`successful READ beyond the end (${request.length}@${request.offset})`)
        break
      }
      if (!overlaps(request, at) && data[i] !== initial[at]) {
        problems.push(`READ ${request.length}@${request.offset} returned a wrong byte at ${at}`)
        break
      }
    }
  }
  return problems
}

async function runCase(lane: Lane, seed: number, index: number, deadlineMs: number): Promise<{ failure: string | null; transmission: boolean; mutated: boolean }> {
  const random = new Random(streamSeed(seed, `nbd case ${index}`))
  const built = buildStream(random, { sizes: SIZES })
  const { bytes, mutations } = mutate(built, random)
  const mem = MemoryDevice.fromBytes(MEM_INITIAL, { name: 'mem' })
  const ro = MemoryDevice.fromBytes(RO_INITIAL, { name: 'ro', readOnly: true })
  lane.current = { mem, ro }
  lane.logs.length = 0
  const what = `[${mutations.join(', ') || 'unmutated'}; ${bytes.length} bytes]`
  try {
    const reply = await withDeadline(converse(lane.path, bytes), deadlineMs, `nbd case ${index}`)
    // Requests the server took before closing finish within a few turns of the event loop.
    await withDeadline(
      (async () => {
        while (lane.server.connectionCount > 0) await new Promise((r) => setTimeout(r, 1))
      })(),
      deadlineMs,
      `nbd case ${index} server side`,
    )
    const session = readSession(bytes, reply, 'mem')
    if (process.env.TORTURE_DEBUG === '1') {
      console.log(`client ${bytes.length} bytes, server ${reply.length} bytes, export ${session.exportName}`)
      for (const r of session.requests) console.log(`  request type ${r.type} flags ${r.flags} cookie ${r.cookie} ${r.length}@${r.offset}`)
      console.log(`  acked writes: ${session.ackedWrites.map((w) => w.cookie).join(' ')}`)
      for (const l of lane.logs) console.log(`  log: ${l}`)
    }
    const problems = [...session.violations]
    const bad = lane.logs.find((l) => l.includes('\n') || /^\s*at /m.test(l) || l.includes('internal error'))
    if (bad) problems.push(`log line: ${bad.split('\n')[0]}`)
    problems.push(...checkDevices(session, mem.readSync(0, MEM_BYTES), ro.readSync(0, RO_BYTES)))
    return { failure: problems.length > 0 ? `${problems.join('; ')} ${what}` : null, transmission: session.exportName !== null, mutated: mutations.length > 0 }
  } catch (err) {
    return { failure: `${describe(err)} ${what}`, transmission: false, mutated: mutations.length > 0 }
  } finally {
    lane.current = null
  }
}

async function withLanes<T>(count: number, fn: (lanes: Lane[]) => Promise<T>): Promise<T> {
  const dir = mkdtempSync(join(tmpdir(), 'blocksnap-nbd-'))
  const lanes: Lane[] = []
  try {
    for (let i = 0; i < count; i++) lanes.push(await openLane(dir, i))
    return await fn(lanes)
  } finally {
    for (const lane of lanes) await lane.server.close()
    rmSync(dir, { recursive: true, force: true })
  }
}

export const nbdCampaign: Campaign = {
  name: 'nbd-streams',
  unit: 'fuzzed NBD client streams',
  run(settings: CampaignSettings): Promise<CampaignResult> {
    return withLanes(LANES, async (lanes) => {
      const counts = { streams: 0, mutated: 0, 'reached transmission': 0 }
      const tick = progress('nbd-streams')
      let failures = 0
      let next = 0
      let stoppedByTime = false
      await Promise.all(
        lanes.map(async (lane) => {
          for (;;) {
            if (Date.now() > settings.stopAt) {
              stoppedByTime = next < settings.count
              return
            }
            const index = next++
            if (index >= settings.count) return
            const result = await runCase(lane, settings.seed, index, settings.deadlineMs)
            counts.streams++
            if (result.mutated) counts.mutated++
            if (result.transmission) counts['reached transmission']++
            if (result.failure) {
              failures++
              settings.onFailure({ campaign: 'nbd-streams', caseId: String(index), message: result.failure })
            }
            tick(counts.streams, settings.count)
          }
        }),
      )
      return { counts, done: counts.streams, failures, stoppedByTime }
    })
  },
  replay(seed, caseId, deadlineMs) {
    return withLanes(1, async ([lane]) => {
      const result = await runCase(lane as Lane, seed, Number(caseId), deadlineMs)
      if (result.failure) throw new Error(result.failure)
    })
  },
}
