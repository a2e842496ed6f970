/**
 * Issue 17 items 3 and 5 on the command line: `blocksnap map` (offline and live) agrees with
 * qemu-img map of the origin file and with a model of what was written; `blocksnap dump` lists a
 * COW's header, geometry and exceptions (checked against what the volume wrote), and on a damaged
 * COW (truncated, bad area) prints what it could read, says where it stopped, and exits 1.
 * The volume is built in process (spawns are kept for the commands under test).
 */
import assert from 'node:assert/strict'
import { cp, mkdtemp, open, rm, truncate } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { Volume } from '../../src/volume/volume.js'
import { requireTools, runOk } from '../support/nbd-tools.js'
import { Random } from '../support/random.js'
import { ServeProcess } from '../support/serve-process.js'
import { assertError, cli, cliOk } from './helpers.js'

const KiB = 1024
const MiB = 1024 * KiB
const SIZE = 8 * MiB
const CHUNK = 512 // 32 exceptions per metadata area, so a few dozen copies fill two areas

let T = ''
let vol = ''
/** Origin chunks (512 B) the snapshot saved, from the writes made after it. */
const savedChunks = new Set<number>()

interface MapDoc {
  version: number
  device: string
  sizeBytes: number
  extents: Array<{ offset: number; length: number; data: boolean; zero: boolean }>
}

before(async () => {
  await requireTools('qemu-img')
  T = await mkdtemp(join(tmpdir(), 'blocksnap-map-dump-'))
  vol = join(T, 'v')
  await Volume.create(vol, { sizeBytes: SIZE })
  const v = await Volume.open(vol)
  try {
    const rnd = new Random(517)
    for (let i = 0; i < 8; i++) await v.origin.write(new Uint8Array(1 + rnd.int(9000)).fill(1), rnd.int(SIZE - 9001))
    await v.createSnapshot('s', { chunkSizeBytes: CHUNK })
    // 40 scattered one-chunk writes and one 8-chunk run: 48 exceptions over two metadata areas.
    for (let i = 0; i < 40; i++) {
      const chunk = rnd.int(SIZE / CHUNK)
      await v.origin.write(new Uint8Array(10).fill(2), chunk * CHUNK + 7)
      savedChunks.add(chunk)
    }
    await v.origin.write(new Uint8Array(8 * CHUNK).fill(3), 1000 * CHUNK)
    for (let c = 1000; c < 1008; c++) savedChunks.add(c)
    await v.origin.flush()
  } finally {
    await v.close()
  }
  // Reserved but never written: reads as zeros, a hole for qemu-img and for map.
  await runOk('fallocate', ['-o', String(6 * MiB), '-l', String(128 * KiB), join(vol, 'origin.img')])
})

after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

const dataOf = (extents: MapDoc['extents']) => extents.filter((e) => e.data).map((e) => [e.offset, e.offset + e.length])

async function qemuData(path: string): Promise<number[][]> {
  const { stdout } = await runOk('qemu-img', ['map', '-U', '--output=json', '-f', 'raw', path])
  const out: number[][] = []
  for (const e of JSON.parse(stdout) as Array<{ start: number; length: number; data: boolean }>) {
    const last = out[out.length - 1]
    if (!e.data) continue
    if (last && last[1] === e.start) last[1] = e.start + e.length
    else out.push([e.start, e.start + e.length])
  }
  return out
}

test('map --json of the origin equals qemu-img map of the origin file; of a snapshot, adds its exceptions; live gives the same', async () => {
  const doc = JSON.parse((await cliOk(['map', vol, '--json'])).toString()) as MapDoc
  assert.equal(doc.version, 1)
  assert.equal(doc.sizeBytes, SIZE)
  assert.equal(doc.extents.reduce((n, e) => n + e.length, 0), SIZE)
  for (const e of doc.extents) assert.equal(e.zero, !e.data)
  const originData = await qemuData(join(vol, 'origin.img'))
  assert.ok(originData.length > 3, 'the origin is sparse with several data extents')
  assert.deepEqual(dataOf(doc.extents), originData)

  // The snapshot: the origin's data plus its saved chunks (512 B each, widened to 4 KiB blocks
  // where they fall in origin data already anyway).
  const snap = JSON.parse((await cliOk(['map', `${vol}@s`, '--json'])).toString()) as MapDoc
  const covered = (at: number) => dataOf(snap.extents).some(([s, e]) => s! <= at && at < e!)
  for (const chunk of savedChunks) assert.ok(covered(chunk * CHUNK) && covered(chunk * CHUNK + CHUNK - 1), `saved chunk ${chunk} is data in the snapshot map`)
  for (const [s, e] of originData) assert.ok(covered(s!) && covered(e! - 1), `origin data [${s}, ${e}) is data in the snapshot map`)
  const expected = new Set<number>()
  for (const [s, e] of originData) for (let b = s! / 512; b < e! / 512; b++) expected.add(b)
  for (const c of savedChunks) expected.add(c)
  const dataBytes = dataOf(snap.extents).reduce((n, [s, e]) => n + e! - s!, 0)
  assert.equal(dataBytes, expected.size * 512, 'nothing else is data')

  const human = (await cliOk(['map', `${vol}@s`])).toString()
  assert.match(human, /^\s*OFFSET\s+LENGTH\s+TYPE\n/)
  assert.ok(human.endsWith(`${vol}@s: ${dataBytes} bytes of data in ${dataOf(snap.extents).length} extents, ${SIZE - dataBytes} bytes read as zeros\n`), human)

  const server = await ServeProcess.start([vol, '--listen', '127.0.0.1:0'])
  try {
    const live = JSON.parse((await cliOk(['map', vol, '--json'])).toString()) as MapDoc
    assert.deepEqual(live, doc, 'live through the control socket')
  } finally {
    process.kill(server.pid as number, 'SIGTERM')
    assert.deepEqual(await server.exit, { code: 0, signal: null }, server.log)
  }
})

interface DumpDoc {
  header: { magic: string; valid: boolean; version: number; chunkSizeSectors: number } | null
  geometry: { chunkSizeBytes: number; exceptionsPerArea: number; cowChunks: number; areasRead: number } | null
  exceptions: number
  runs: Array<{ originChunk: number; cowChunk: number; chunks: number }>
  complete: boolean
  stop: { area: number | null; entry: number | null; offsetBytes: number; reason: string }
}

const originChunksOf = (d: DumpDoc) => d.runs.flatMap((r) => Array.from({ length: r.chunks }, (_, k) => r.originChunk + k))

test('dump --json of a clean COW: header, geometry, and exactly the saved chunks as runs', async () => {
  const d = JSON.parse((await cliOk(['dump', `${vol}@s`, '--json'])).toString()) as DumpDoc
  assert.deepEqual(d.header, { magic: 'SnAp', valid: true, version: 1, chunkSizeSectors: 1 })
  assert.equal(d.geometry?.chunkSizeBytes, CHUNK)
  assert.equal(d.geometry?.exceptionsPerArea, 32)
  assert.equal(d.geometry?.areasRead, 2)
  assert.equal(d.exceptions, savedChunks.size)
  assert.deepEqual(originChunksOf(d).sort((a, b) => a - b), [...savedChunks].sort((a, b) => a - b))
  // The 8-chunk write was copied as one run of consecutive COW chunks.
  assert.ok(d.runs.some((r) => r.originChunk === 1000 && r.chunks === 8), JSON.stringify(d.runs))
  assert.equal(d.complete, true)
  assert.deepEqual(d.stop, { area: 1, entry: savedChunks.size - 32, offsetBytes: (1 + 33) * CHUNK + (savedChunks.size - 32) * 16, reason: 'end of the exception table' })

  const human = (await cliOk(['dump', `${vol}@s`])).toString()
  assert.match(human, /^header: magic SnAp, valid, version 1, chunk 1 sectors$/m)
  assert.match(human, new RegExp(`^exceptions: ${savedChunks.size} in ${d.runs.length} runs$`, 'm'))
  assert.match(human, /^stopped at area 1 entry \d+ \(byte \d+\): end of the exception table$/m)
})

/** A copy of the volume whose COW `damage` changes. */
async function damaged(name: string, damage: (cow: string) => Promise<void>): Promise<string> {
  const copy = join(T, name)
  await cp(vol, copy, { recursive: true })
  await damage(join(copy, 'snapshots', 's.cow'))
  return copy
}

test('dump of a truncated COW prints the first area, says area 1 is missing, exits 1', async () => {
  // Area 1 is chunk 34: cut the file there.
  const copy = await damaged('truncated', (cow) => truncate(cow, 34 * CHUNK))
  const r = await cli(['dump', `${copy}@s`, '--json'])
  assert.equal(r.code, 1, r.stderr)
  assert.match(r.stderr, /^blocksnap: dump: .*@s: stopped early: metadata area 1 \(chunk 34\) is missing: the file ends at 17408 bytes\n$/)
  const d = JSON.parse(r.stdout.toString()) as DumpDoc
  assert.equal(d.complete, false)
  assert.equal(d.exceptions, 32)
  assert.deepEqual({ area: d.stop.area, entry: d.stop.entry, offsetBytes: d.stop.offsetBytes }, { area: 1, entry: null, offsetBytes: 34 * CHUNK })
})

test('dump of a COW with an undecodable entry prints the entries before it and names the entry', async () => {
  // Entry 5 of area 0 (chunk 1): new_chunk's high word beyond 2^53.
  const copy = await damaged('bad-area', async (cow) => {
    const fh = await open(cow, 'r+')
    await fh.write(Buffer.from([0xff, 0xff, 0xff, 0xff]), 0, 4, CHUNK + 5 * 16 + 12)
    await fh.close()
  })
  const r = await cli(['dump', `${copy}@s`])
  assert.equal(r.code, 1, r.stderr)
  assert.match(r.stderr, /^blocksnap: dump: .*@s: stopped early: metadata area 0 entry 5: new_chunk \d+ at byte 88 does not fit in 53 bits\n$/)
  const out = r.stdout.toString()
  assert.match(out, /^exceptions: 5 in \d+ runs?$/m)
  assert.match(out, /^STOPPED EARLY at area 0 entry 5 \(byte 592\): /m)
})

test('dump refuses a missing snapshot and an origin with one error line', async () => {
  assertError(await cli(['dump', `${vol}@nope`]), 1, /no snapshot 'nope'/)
  assertError(await cli(['dump', vol]), 2, /expected VOL@SNAP/)
})
