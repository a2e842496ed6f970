/**
 * COW image fuzzing. Valid images are built by the real engine (an Origin with one persistent
 * snapshot over memory devices, random origin and snapshot writes), then damaged: bit flips in
 * the header, areas and entries, truncation, out-of-range, duplicate and metadata-pointing
 * chunks, areas past the end, zeroed areas, garbage. Each damaged image is opened by the engine
 * and checked by src/volume/check.ts. Verdicts come from cow-model.ts:
 * - the model refuses: opening must fail with a clean SnapError of the model's code;
 * - the model accepts: opening must succeed, the snapshot must be valid or invalid as the header
 *   says, and every read must equal the model's view; an origin write afterwards must leave
 *   that view unchanged (new copies must not land on chunks the table uses);
 * - checkCow never throws, and lists a problem exactly when the model finds one.
 *
 * Case i uses base image floor(i / CASES_PER_BASE), so replaying a case rebuilds one base.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { MemoryDevice } from '../src/device/memory-device.js'
import { ExceptionEvents } from '../src/snapshot/exception-events.js'
import { Origin } from '../src/snapshot/origin.js'
import { Snapshot } from '../src/snapshot/snapshot.js'
import { PersistentStore } from '../src/store/persistent-store.js'
import { checkCow } from '../src/volume/check.js'
import { Random, streamSeed } from '../test/support/random.js'
import { type Verdict, decodeCow, expectedView } from './cow-model.js'
import { type Campaign, type CampaignResult, type CampaignSettings, cleanRefusal, describe, progress, withDeadline } from './harness.js'

const CASES_PER_BASE = 25

interface BaseImage {
  readonly chunkBytes: number
  readonly origin: Uint8Array
  readonly cow: Uint8Array
}

const CHUNK_CHOICES = [512, 512, 512, 512, 1024, 1024, 2048, 4096, 4096, 16384, 65536]

/** Most exceptions per base for a chunk size: several areas for small chunks, a few otherwise. */
function maxExceptions(chunkBytes: number): number {
  const perArea = chunkBytes / 16
  if (chunkBytes <= 1024) return 3 * perArea + 5
  if (chunkBytes <= 4096) return perArea + 20
  return 6
}

async function buildBase(seed: number): Promise<BaseImage> {
  const random = new Random(seed)
  const chunkBytes = random.pick(CHUNK_CHOICES)
  const wanted = random.chance(0.1) ? 0 : random.int(maxExceptions(chunkBytes) + 1)
  const originChunks = wanted + 1 + random.int(6)
  const originBytes = originChunks * chunkBytes - (random.chance(0.3) ? 1 + random.int(chunkBytes - 1) : 0)
  const perArea = chunkBytes / 16
  // Room for the exceptions, their areas, and sometimes spare chunks at the end.
  const neededChunks = 2 + wanted + Math.floor(wanted / perArea) + 1
  const cowBytes = (neededChunks + (random.chance(0.5) ? random.int(4) : 0)) * chunkBytes
  const origin = new Origin(MemoryDevice.fromBytes(random.bytes(originBytes)), { events: new ExceptionEvents(), writeBackBytes: 0 })
  const cowDevice = new MemoryDevice(cowBytes)
  const snap = new Snapshot({ name: 'fuzz', store: new PersistentStore(cowDevice, { chunkBytes }) })
  await origin.addSnapshot(snap)
  // Touch `wanted` distinct chunks in random order, from the origin or through the snapshot.
  const chunks = Array.from({ length: originChunks }, (_, i) => i)
  for (let i = chunks.length - 1; i > 0; i--) {
    const j = random.int(i + 1)
    ;[chunks[i], chunks[j]] = [chunks[j] as number, chunks[i] as number]
  }
  for (const chunk of chunks.slice(0, wanted)) {
    const start = chunk * chunkBytes
    const length = Math.min(chunkBytes, originBytes - start)
    const within = random.int(length)
    const data = random.bytes(1 + random.int(length - within))
    if (random.chance(0.7)) await origin.write(data, start + within)
    else await snap.write(data, start + within)
  }
  if (random.chance(0.05)) await snap.store.dropSnapshot()
  await origin.flush()
  await snap.flush()
  const cow = cowDevice.readSync(0, cowDevice.sizeBytes)
  const originNow = (origin.device as MemoryDevice).readSync(0, originBytes)
  await origin.close()
  return { chunkBytes, origin: originNow, cow }
}

// ---- mutations ---------------------------------------------------------------------------------

function setU32(image: Uint8Array, at: number, value: number): void {
  if (at + 4 > image.length) return
  new DataView(image.buffer, image.byteOffset).setUint32(at, value >>> 0, true)
}

function setU64(image: Uint8Array, at: number, value: bigint): void {
  if (at + 8 > image.length) return
  new DataView(image.buffer, image.byteOffset).setBigUint64(at, BigInt.asUintN(64, value), true)
}

function getU64(image: Uint8Array, at: number): bigint {
  if (at + 8 > image.length) return 0n
  return new DataView(image.buffer, image.byteOffset).getBigUint64(at, true)
}

interface Geometry {
  readonly chunkBytes: number
  readonly perArea: number
  readonly stride: number
  /** Entries in use (table length) when the image was built. */
  readonly entries: number
}

function geometry(base: BaseImage): Geometry {
  const chunkBytes = base.chunkBytes
  const perArea = chunkBytes / 16
  const stride = perArea + 1
  let entries = 0
  for (let area = 0; ; area++) {
    const at = (1 + area * stride) * chunkBytes
    let i = 0
    for (; i < perArea && at + 16 * i + 16 <= base.cow.length && getU64(base.cow, at + 16 * i + 8) !== 0n; i++) entries++
    if (i < perArea) break
  }
  return { chunkBytes, perArea, stride, entries }
}

/** Byte offset of table entry `index` (0.. across areas). */
function entryAt(g: Geometry, index: number): number {
  const area = Math.floor(index / g.perArea)
  return (1 + area * g.stride) * g.chunkBytes + 16 * (index % g.perArea)
}

/** An entry index near the table (mostly a used one). */
function someEntry(g: Geometry, random: Random): number {
  if (g.entries > 0 && random.chance(0.8)) return random.int(g.entries)
  return random.int(g.entries + 2)
}

type Mutation = (image: Uint8Array, g: Geometry, random: Random) => Uint8Array

const MUTATIONS: Record<string, Mutation> = {
  'header bit flip': (image, _g, random) => {
    const at = random.chance(0.9) ? random.int(16) : random.int(Math.min(512, image.length))
    image[at]! ^= 1 << random.int(8)
    return image
  },
  'header field': (image, _g, random) => {
    const field = random.pick([0, 4, 8, 12])
    const value = random.pick([0, 1, 2, 0xffffffff, random.int(2 ** 32), 1 << random.int(32), 0x70416e53])
    setU32(image, field, value)
    return image
  },
  'area bit flip': (image, g, random) => {
    const at = entryAt(g, someEntry(g, random)) + random.int(16)
    if (at < image.length) image[at]! ^= 1 << random.int(8)
    return image
  },
  truncate: (image, g, random) => {
    const roll = random.next()
    const size = roll < 0.4 ? random.int(image.length) : roll < 0.8 ? g.chunkBytes * random.int(Math.ceil(image.length / g.chunkBytes)) : image.length - 1 - random.int(Math.min(image.length, 600))
    return image.slice(0, Math.max(0, size))
  },
  'new_chunk out of range': (image, g, random) => {
    const chunks = Math.floor(image.length / g.chunkBytes)
    const value = random.pick([BigInt(chunks), BigInt(chunks + random.int(100)), 2n ** 53n, 2n ** 53n - 1n, 2n ** 64n - 1n, 2n ** 32n, BigInt(random.int(2 ** 31))])
    setU64(image, entryAt(g, someEntry(g, random)) + 8, value)
    return image
  },
  'old_chunk out of range': (image, g, random) => {
    const value = random.pick([2n ** 53n, 2n ** 53n - 1n, 2n ** 64n - 1n, 2n ** 32n, 2n ** 32n - 1n, BigInt(random.int(2 ** 31)), BigInt(1000 + random.int(100))])
    setU64(image, entryAt(g, someEntry(g, random)), value)
    return image
  },
  'duplicate old chunk': (image, g, random) => {
    if (g.entries < 2) return image
    const a = random.int(g.entries)
    const b = random.int(g.entries)
    setU64(image, entryAt(g, a), getU64(image, entryAt(g, b)))
    return image
  },
  'duplicate new chunk': (image, g, random) => {
    if (g.entries < 2) return image
    const a = random.int(g.entries)
    const b = random.int(g.entries)
    setU64(image, entryAt(g, a) + 8, getU64(image, entryAt(g, b) + 8))
    return image
  },
  'entry points at metadata': (image, g, random) => {
    const area = random.int(Math.max(1, Math.floor(image.length / g.chunkBytes / g.stride) + 1))
    setU64(image, entryAt(g, someEntry(g, random)) + 8, BigInt(1 + area * g.stride))
    return image
  },
  'area past the end': (image, g, random) => {
    // Fill the last area so the next one must be read, then cut the image before it (or not).
    const last = Math.floor(g.entries / g.perArea)
    const start = (1 + last * g.stride) * g.chunkBytes
    for (let i = 0; i < g.perArea; i++) {
      const at = start + 16 * i
      if (getU64(image, at + 8) === 0n) {
        setU64(image, at, BigInt(100000 + i))
        setU64(image, at + 8, BigInt(2 + last * g.stride + i))
      }
    }
    const nextArea = (1 + (last + 1) * g.stride) * g.chunkBytes
    if (random.chance(0.7)) return image.slice(0, Math.min(image.length, nextArea + random.int(g.chunkBytes)))
    return image
  },
  'zeroed area': (image, g, random) => {
    const area = random.int(Math.floor(g.entries / g.perArea) + 1)
    const start = (1 + area * g.stride) * g.chunkBytes
    if (start < image.length) image.fill(0, start, Math.min(image.length, start + g.chunkBytes))
    return image
  },
  'terminator moved': (image, g, random) => {
    if (random.chance(0.5) && g.entries > 0) {
      image.fill(0, entryAt(g, random.int(g.entries)) + 8, entryAt(g, random.int(g.entries)) + 16)
    } else {
      const at = entryAt(g, g.entries)
      setU64(image, at, BigInt(random.int(50)))
      setU64(image, at + 8, BigInt(random.int(Math.floor(image.length / g.chunkBytes) + 2)))
    }
    return image
  },
  garbage: (image, g, random) => {
    const start = random.chance(0.5) ? entryAt(g, someEntry(g, random)) : random.int(image.length)
    const length = 1 + random.int(random.chance(0.5) ? 64 : g.chunkBytes)
    const end = Math.min(image.length, start + length)
    if (end > start) image.set(random.bytes(end - start), start)
    return image
  },
  'grown with garbage': (image, g, random) => {
    const grown = new Uint8Array(image.length + 1 + random.int(3 * g.chunkBytes))
    grown.set(image)
    grown.set(random.chance(0.5) ? random.bytes(grown.length - image.length) : new Uint8Array(grown.length - image.length), image.length)
    return grown
  },
}

const MUTATION_NAMES = Object.keys(MUTATIONS)

interface CowCase {
  readonly mutations: string[]
  readonly image: Uint8Array
  readonly suppliedChunkBytes: number
  readonly verdict: Verdict
  readonly base: BaseImage
  readonly random: Random
}

function makeCase(base: BaseImage, seed: number): CowCase {
  const random = new Random(seed)
  const g = geometry(base)
  let image: Uint8Array = base.cow.slice()
  const mutations: string[] = []
  const n = random.chance(0.05) ? 0 : 1 + (random.chance(0.3) ? random.int(3) : 0)
  for (let i = 0; i < n; i++) {
    const name = random.pick(MUTATION_NAMES)
    if (image.length === 0) break
    mutations.push(name)
    image = (MUTATIONS[name] as Mutation)(image, g, random)
  }
  const suppliedChunkBytes = random.chance(0.1) ? 0 : random.chance(0.9) ? base.chunkBytes : random.pick(CHUNK_CHOICES)
  const verdict = decodeCow(image, suppliedChunkBytes === 0 ? 16384 : suppliedChunkBytes)
  return { mutations, image, suppliedChunkBytes, verdict, base, random }
}

function differsAt(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length)
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i
  return a.length === b.length ? -1 : n
}

/** Whether allocating COW chunks for `chunks` more exceptions could run past the device. */
function mayRunOutOfSpace(verdict: Verdict, imageBytes: number, chunks: number): boolean {
  if (verdict.kind !== 'table' && verdict.kind !== 'new') return true
  const stride = verdict.chunkBytes / 16 + 1
  let next = verdict.kind === 'table' ? verdict.highest : 2
  if (next % stride === 1) next++
  for (let i = 0; i < chunks; i++) {
    if ((next + 2) * verdict.chunkBytes > imageBytes) return true // the chunk, or the next area it would zero
    next = (next + 1) % stride === 1 ? next + 2 : next + 1
  }
  return false
}

/** Opens the damaged image and holds it to the model; returns a failure message or null. */
async function checkEngine(c: CowCase): Promise<string | null> {
  const { image, verdict, base, random } = c
  const origin = new Origin(MemoryDevice.fromBytes(base.origin), { events: new ExceptionEvents(), writeBackBytes: 0 })
  const cowDevice = MemoryDevice.fromBytes(image)
  const options = c.suppliedChunkBytes === 0 ? {} : { chunkBytes: c.suppliedChunkBytes }
  let snap: Snapshot
  try {
    snap = new Snapshot({ name: 'fuzz', store: new PersistentStore(cowDevice, options) })
    await origin.addSnapshot(snap)
  } catch (err) {
    await origin.close().catch(() => {})
    const unclean = cleanRefusal(err)
    if (unclean) return `open: ${unclean}`
    const code = (err as { code: string }).code
    if (verdict.kind !== 'refuse') return `open refused (${code}: ${(err as Error).message}) but the model accepts (${verdict.kind})`
    if (!verdict.codes.includes(code)) return `open refused with ${code} (${(err as Error).message}), model expects ${verdict.codes.join('/')} (${verdict.why})`
    return null
  }
  try {
    if (verdict.kind === 'refuse') return `opened, but the model refuses: ${verdict.why}`
    if (verdict.kind === 'invalid') {
      if (snap.valid) return 'opened valid, but the header says invalid'
      try {
        await snap.read(0, Math.min(512, base.origin.length))
        return 'read of an invalid snapshot succeeded'
      } catch (err) {
        const unclean = cleanRefusal(err)
        return unclean ? `read of invalid snapshot: ${unclean}` : null
      }
    }
    if (!snap.valid) return 'opened invalid, but the model says valid'
    if (snap.chunkBytes !== verdict.chunkBytes) return `chunk size ${snap.chunkBytes}, model ${verdict.chunkBytes}`
    const expected = expectedView(verdict, image, base.origin)
    const whole = await snap.read(0, expected.length)
    let at = differsAt(whole, expected)
    if (at !== -1) return `snapshot view differs from the model at byte ${at}`
    for (let i = 0; i < 2; i++) {
      const start = random.int(expected.length)
      const length = 1 + random.int(expected.length - start)
      at = differsAt(await snap.read(start, length), expected.subarray(start, start + length))
      if (at !== -1) return `read [${start}, +${length}) differs from the model at byte ${start + at}`
    }
    // An origin write copies into the snapshot: the new copies must not clobber table chunks.
    const start = random.int(expected.length)
    const length = 1 + random.int(Math.min(expected.length - start, 3 * verdict.chunkBytes))
    const touched = Math.floor((start + length - 1) / verdict.chunkBytes) - Math.floor(start / verdict.chunkBytes) + 1
    await origin.write(random.bytes(length), start)
    if (!snap.valid) {
      if (!mayRunOutOfSpace(verdict, image.length, touched)) return 'snapshot invalidated by an origin write with room left'
      return null
    }
    at = differsAt(await snap.read(0, expected.length), expected)
    if (at !== -1) return `after an origin write the snapshot view differs from the model at byte ${at}`
    return null
  } catch (err) {
    return `after open: ${describe(err)}`
  } finally {
    await origin.close().catch(() => {})
  }
}

/** checkCow on the image as a file: must not throw, and must see exactly what the model sees. */
async function checkChecker(c: CowCase, path: string): Promise<string | null> {
  writeFileSync(path, c.image)
  let problems: string[]
  try {
    problems = await checkCow(path, { originSizeBytes: c.base.origin.length })
  } catch (err) {
    return `checkCow threw: ${describe(err)}`
  }
  const v = c.verdict
  const chunkBytes = v.kind === 'refuse' ? 0 : v.chunkBytes
  const originChunks = chunkBytes === 0 ? 0 : Math.ceil(c.base.origin.length / chunkBytes)
  const clean = v.kind === 'table' && !v.sharedNewChunk && [...v.table.keys()].every((old) => old < originChunks)
  if (problems.some((p) => p.includes('\n'))) return `checkCow problem spans lines: ${JSON.stringify(problems)}`
  // A new (all-zero header) COW is a problem for check, not for open.
  if (clean && problems.length > 0) return `checkCow reports problems on a clean COW: ${problems.slice(0, 3).join('; ')}`
  if (!clean && problems.length === 0) return `checkCow finds nothing, model: ${v.kind === 'refuse' ? v.why : v.kind}`
  return null
}

async function runCase(index: number, seed: number, bases: Map<number, BaseImage>, path: string, deadlineMs: number): Promise<{ failure: string | null; kind: Verdict['kind'] }> {
  const group = Math.floor(index / CASES_PER_BASE)
  let base = bases.get(group)
  if (!base) {
    bases.clear()
    base = await buildBase(streamSeed(seed, `cow base ${group}`))
    bases.set(group, base)
  }
  const c = makeCase(base, streamSeed(seed, `cow case ${index}`))
  const what = `[${c.mutations.join(', ') || 'none'}; chunk ${base.chunkBytes}; ${c.image.length} bytes]`
  const failure = await withDeadline(
    (async () => (await checkEngine(c)) ?? (await checkChecker(c, path)))(),
    deadlineMs,
    `cow case ${index}`,
  ).catch((err) => describe(err))
  return { failure: failure === null ? null : `${failure} ${what}`, kind: c.verdict.kind }
}

export const cowCampaign: Campaign = {
  name: 'cow-images',
  unit: 'fuzzed COW images',
  async run(settings: CampaignSettings): Promise<CampaignResult> {
    const dir = mkdtempSync(join(existsShm() ? '/dev/shm' : tmpdir(), 'blocksnap-torture-'))
    const path = join(dir, 'cow')
    const bases = new Map<number, BaseImage>()
    const counts = { images: 0, refused: 0, 'opened and read as modelled': 0, 'opened invalid': 0 }
    const tick = progress('cow-images')
    let failures = 0
    let stoppedByTime = false
    try {
      for (let i = 0; i < settings.count; i++) {
        if (Date.now() > settings.stopAt) {
          stoppedByTime = true
          break
        }
        const { failure, kind } = await runCase(i, settings.seed, bases, path, settings.deadlineMs)
        counts.images++
        if (failure) {
          failures++
          settings.onFailure({ campaign: 'cow-images', caseId: String(i), message: failure })
        } else {
          if (kind === 'refuse') counts.refused++
          else if (kind === 'invalid') counts['opened invalid']++
          else counts['opened and read as modelled']++
        }
        tick(i + 1, settings.count)
      }
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
    return { counts, done: counts.images, failures, stoppedByTime }
  },
  async replay(seed, caseId, deadlineMs) {
    const dir = mkdtempSync(join(tmpdir(), 'blocksnap-torture-'))
    try {
      const { failure } = await runCase(Number(caseId), seed, new Map(), join(dir, 'cow'), deadlineMs)
      if (failure) throw new Error(failure)
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  },
}

function existsShm(): boolean {
  try {
    writeFileSync('/dev/shm/.blocksnap-torture-probe', '')
    rmSync('/dev/shm/.blocksnap-torture-probe')
    return true
  } catch {
    return false
  }
}
