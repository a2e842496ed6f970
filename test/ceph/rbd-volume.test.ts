/**
 * Issue 18 item 3: a volume whose origin and three COWs are RBD images on a real one-node Ceph
 * cluster, through the compiled CLI:
 * - CLI writes and reads against byte-array models (origin and each snapshot's view); the same
 *   operations on a twin volume of files give byte-equal COWs, and each exported COW is a
 *   well-formed kernel COW (header, exception areas decoded here from the format's definition,
 *   every exception's data equal to the snapshot model) that `blocksnap check` accepts;
 * - `serve` with a live merge while qemu-io writes through NBD;
 * - kill -9 of `serve` in the middle of a second, rate-limited merge (mid-way by its progress
 *   event), no qemu-nbd gateway left behind, and a restart that resumes the merge;
 * - at the end `rbd export` of the origin image equals the model.
 * The steps run in order and share one cluster and one volume.
 */
import assert from 'node:assert/strict'
import { mkdir, readFile, readdir, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { CephCluster } from '../support/ceph.js'
import { freePort } from '../support/free-port.js'
import { areaLocation, entriesPerArea } from '../support/byte-builder.js'
import { requireTools, run } from '../support/nbd-tools.js'
import { Random } from '../support/random.js'
import { ServeProcess } from '../support/serve-process.js'
import { assertBytes, cli, cliOk, parseList, pattern } from '../cli/helpers.js'

const KiB = 1024
const MiB = 1024 * KiB
const CHUNK = 4 * KiB
const ORIGIN_BYTES = 4 * MiB
const COW_BYTES = 8 * MiB
const SEED = 1803
/** Slow enough that a merge of a few hundred chunks runs for tens of seconds until lifted. */
const SLOW_RATE = 32 * KiB
const NAME = 'rvol'

let server: ServeProcess | null = null
// Registered before the cluster's own after(), so a server still running dies before the cluster stops.
after(async () => {
  if (server?.alive() && server.pid !== undefined) {
    process.kill(server.pid, 'SIGKILL')
    await server.exit
  }
})

await requireTools('qemu-io')
const cluster = await CephCluster.startForFile()
const T = cluster.dir
const vol = join(T, NAME)
const fileVol = join(T, 'fvol')
let savedStateDir: string | undefined
let savedTmpDir: string | undefined
let port = 0

/** The models: what the origin and each snapshot must read as, and the chunks each snapshot's COW holds. */
const origin = Buffer.alloc(ORIGIN_BYTES)
const snaps = new Map<string, { view: Buffer; chunks: Set<number> }>()

before(async () => {
  savedStateDir = process.env['BLOCKSNAP_STATE_DIR']
  savedTmpDir = process.env['TMPDIR']
  process.env['BLOCKSNAP_STATE_DIR'] = join(T, 'state') // inherited by the CLI processes
  // The gateways' socket directories: the one a kill -9 of serve leaves goes with the cluster's.
  await mkdir(join(T, 'tmp'))
  process.env['TMPDIR'] = join(T, 'tmp')
})

after(() => {
  if (savedStateDir === undefined) delete process.env['BLOCKSNAP_STATE_DIR']
  else process.env['BLOCKSNAP_STATE_DIR'] = savedStateDir
  if (savedTmpDir === undefined) delete process.env['TMPDIR']
  else process.env['TMPDIR'] = savedTmpDir
})

function chunksOf(offset: number, length: number): number[] {
  const out: number[] = []
  for (let c = Math.floor(offset / CHUNK); c * CHUNK < offset + length; c++) out.push(c)
  return out
}

/** Writes `data` at `offset` of the origin (snap null) or a snapshot, in both volumes and the models. */
async function write(snap: string | null, offset: number, data: Buffer): Promise<void> {
  const input = join(T, 'input.bin')
  await writeFile(input, data)
  for (const v of [vol, fileVol]) await cliOk(['write', snap === null ? v : `${v}@${snap}`, '--offset', String(offset), '--input', input])
  applyOriginWrite(snap, offset, data)
}

/** What a write does to the models: a snapshot write lands in its view; an origin write first saves old chunks in every snapshot. */
function applyOriginWrite(snap: string | null, offset: number, data: Buffer): void {
  if (snap !== null) {
    const s = snaps.get(snap)!
    data.copy(s.view, offset)
    for (const c of chunksOf(offset, data.length)) s.chunks.add(c)
    return
  }
  for (const s of snaps.values()) for (const c of chunksOf(offset, data.length)) s.chunks.add(c)
  data.copy(origin, offset)
}

async function randomWrites(random: Random, count: number, seed: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const length = 1 + random.int(200 * KiB)
    const offset = random.int(ORIGIN_BYTES - length)
    await write(null, offset, pattern(length, seed + i))
  }
}

async function snapshot(name: string): Promise<void> {
  const image = `cow-${name}`
  await cliOk(['snapshot', `${vol}@${name}`, '--cow', await cluster.createImage(image, COW_BYTES)])
  await cliOk(['snapshot', `${fileVol}@${name}`, '--cow', join(T, `${image}.cow`), '--cow-size', String(COW_BYTES)])
  snaps.set(name, { view: Buffer.from(origin), chunks: new Set() })
}

async function readAll(device: string): Promise<Buffer> {
  return cliOk(['read', device, '--offset', '0', '--length', String(ORIGIN_BYTES)])
}

/**
 * Decodes a kernel COW image from the format's definition (dm-snap-persistent.c): header
 * {magic "SnAp", valid 1, version 1, chunk size in sectors}, then areas of chunk/16 entries
 * {old chunk, new chunk} at chunks 1 + k*(E+1), each followed by its data chunks, the table
 * ending at the first entry whose new chunk is 0. Returns old chunk -> new chunk.
 */
function decodeCow(image: Buffer, what: string): Map<number, number> {
  assert.deepEqual(
    { magic: image.readUInt32LE(0), valid: image.readUInt32LE(4), version: image.readUInt32LE(8), chunkSectors: image.readUInt32LE(12) },
    { magic: 0x70416e53, valid: 1, version: 1, chunkSectors: CHUNK / 512 },
    `${what}: header`,
  )
  const perArea = entriesPerArea(CHUNK)
  const table = new Map<number, number>()
  const used = new Set<number>()
  for (let k = 0; ; k++) {
    const area = areaLocation(CHUNK, k)
    assert.ok((area + 1) * CHUNK <= image.length, `${what}: area ${k} lies beyond the image`)
    for (let i = 0; i < perArea; i++) {
      const at = area * CHUNK + i * 16
      const oldChunk = Number(image.readBigUInt64LE(at))
      const newChunk = Number(image.readBigUInt64LE(at + 8))
      if (newChunk === 0) return table
      // A data chunk lies after its area, before the next area, inside the image.
      assert.ok(newChunk > area && newChunk <= area + perArea && (newChunk + 1) * CHUNK <= image.length, `${what}: entry ${k}/${i} points at chunk ${newChunk}`)
      assert.ok(oldChunk < ORIGIN_BYTES / CHUNK, `${what}: entry ${k}/${i} names origin chunk ${oldChunk}`)
      assert.ok(!used.has(newChunk), `${what}: COW chunk ${newChunk} used twice`)
      used.add(newChunk)
      table.set(oldChunk, newChunk) // a later entry for the same chunk supersedes (kernel replay)
    }
  }
}

/** The exported COW holds exactly the model's chunks, each with the snapshot's data. */
function assertCowMatches(image: Buffer, name: string, what: string): void {
  const s = snaps.get(name)!
  const table = decodeCow(image, what)
  assert.deepEqual([...table.keys()].sort((a, b) => a - b), [...s.chunks].sort((a, b) => a - b), `${what}: the chunks with exceptions`)
  for (const [oldChunk, newChunk] of table) {
    const end = Math.min(ORIGIN_BYTES, (oldChunk + 1) * CHUNK)
    assertBytes(image.subarray(newChunk * CHUNK, newChunk * CHUNK + (end - oldChunk * CHUNK)), s.view.subarray(oldChunk * CHUNK, end), `${what}: data of chunk ${oldChunk}`)
  }
}

/**
 * `blocksnap check` on exported images: a volume of files over a copy of the exported origin,
 * the exported COWs imported in place; clean, and each snapshot reads as its model.
 */
async function checkExported(label: string, names: readonly string[]): Promise<void> {
  const dir = join(T, `exported-${label}`)
  const originFile = join(T, `exported-${label}-origin.raw`)
  await cluster.exportImageTo('origin', originFile)
  await cliOk(['create', dir, '--origin', originFile])
  for (const name of names) {
    const cowFile = join(T, `exported-${label}-${name}.raw`)
    await cluster.exportImageTo(`cow-${name}`, cowFile)
    await cliOk(['import', `${dir}@${name}`, '--cow', cowFile, '--in-place'])
  }
  const checked = await cli(['check', dir])
  assert.equal(checked.code, 0, `blocksnap check of the exported images: ${checked.stderr}${checked.stdout.toString()}`)
  for (const name of names) assertBytes(await readAll(`${dir}@${name}`), snaps.get(name)!.view, `exported ${name} read through blocksnap`)
}

/** PIDs of qemu-nbd processes serving images of this test's cluster. */
async function gatewaysOfCluster(): Promise<number[]> {
  const pids: number[] = []
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    const cmdline = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '')
    const state = await readFile(`/proc/${entry}/stat`, 'utf8').catch(() => '')
    if (cmdline.startsWith('qemu-nbd\0') && cmdline.includes(cluster.conf) && !/\) Z /.test(state)) pids.push(Number(entry))
  }
  return pids
}

/** Resolves once the server has logged a line matching `re` (an event, not a time). */
function logged(served: ServeProcess, re: RegExp): Promise<void> {
  return served.waitForLog(re)
}

async function serve(): Promise<ServeProcess> {
  server = await ServeProcess.start([vol, '--listen', `127.0.0.1:${port}`], 60_000)
  return server
}

/** qemu-io writes through the served origin export; the models follow. */
async function nbdWrites(seed: number, count: number): Promise<void> {
  const random = new Random(seed)
  const commands: string[] = []
  const writes: Array<[number, number, number]> = []
  for (let i = 0; i < count; i++) {
    const length = (1 + random.int(32)) * 512
    const offset = random.int((ORIGIN_BYTES - length) / 512) * 512
    const byte = 1 + random.int(255)
    commands.push('-c', `write -P ${byte} ${offset} ${length}`)
    writes.push([offset, length, byte])
  }
  const result = await run('qemu-io', ['-f', 'raw', ...commands, `nbd://127.0.0.1:${port}/${NAME}`])
  assert.equal(result.code, 0, `qemu-io: ${result.stderr}`)
  for (const [offset, length, byte] of writes) applyOriginWrite(null, offset, Buffer.alloc(length, byte))
}

/** What an origin merge of `name` does to the models: the origin becomes its view, other snapshots keep theirs. */
function applyMerge(name: string): void {
  const s = snaps.get(name)!
  for (const other of snaps.values()) {
    if (other === s) continue
    for (const c of s.chunks) other.chunks.add(c) // reverting a chunk of the origin saves it first
  }
  s.view.copy(origin)
  snaps.delete(name)
}

describe('a volume on Ceph RBD: origin and three COWs are RBD images', { timeout: 300_000 }, () => {
  it('CLI I/O against a model; the RBD COWs equal the file COWs of the same operations and are kernel COWs', async () => {
    const random = new Random(SEED)
    await cliOk(['create', vol, '--origin', await cluster.createImage('origin', ORIGIN_BYTES)])
    const twinOrigin = join(T, 'fvol-origin.img')
    await writeFile(twinOrigin, Buffer.alloc(ORIGIN_BYTES))
    await cliOk(['create', fileVol, '--origin', twinOrigin])
    const list = parseList(await cliOk(['list', vol, '--json']))
    assert.equal(list.sizeBytes, ORIGIN_BYTES, 'the size comes from the RBD image')
    assert.equal(list.originPath, cluster.address('origin'))

    await randomWrites(random, 4, SEED)
    await snapshot('s1')
    await randomWrites(random, 4, SEED + 100)
    await write('s1', 12_345, pattern(9000, SEED + 150)) // a snapshot write lands in its COW
    await snapshot('s2')
    await randomWrites(random, 4, SEED + 200)
    await snapshot('s3')
    await randomWrites(random, 3, SEED + 300)

    assertBytes(await readAll(vol), origin, 'origin read through the CLI')
    for (const [name, s] of snaps) assertBytes(await readAll(`${vol}@${name}`), s.view, `${name} read through the CLI`)
    assertBytes(await cluster.exportImage('origin'), origin, 'rbd export of the origin image')
    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.deepEqual(
      info.snapshots.map((s) => [s.name, s.cowPath, s.cowExternal, s.cowSizeBytes]),
      ['s1', 's2', 's3'].map((n) => [n, cluster.address(`cow-${n}`), true, COW_BYTES]),
    )

    for (const name of snaps.keys()) {
      const exported = await cluster.exportImage(`cow-${name}`)
      assert.equal(exported.length, COW_BYTES)
      const twin = await readFile(join(T, `cow-${name}.cow`))
      assert.equal((await stat(join(T, `cow-${name}.cow`))).size, COW_BYTES)
      assertBytes(exported, twin, `rbd export of cow-${name} against the file COW of the same operations`)
      assertCowMatches(exported, name, `rbd export of cow-${name}`)
    }
    await checkExported('offline', ['s1', 's2', 's3'])
  })

  it('serve: a live merge of s1 while qemu-io writes through NBD', async () => {
    port = await freePort()
    const served = await serve()
    // At 1 byte/s the first step merges one chunk and the next is due in over an hour: the merge
    // is still running whenever the writer ends, however slow the machine, until --rate 0 below.
    await cliOk(['merge', `${vol}@s1`, '--rate', '1'])
    applyMerge('s1')
    await nbdWrites(SEED + 400, 24)
    assert.equal(parseList(await cliOk(['list', vol, '--json'])).merge?.snapshot, 's1', 'the writer ran while the merge did')
    const done = logged(served, /merge of s1 complete/)
    await cliOk(['merge', `${vol}@s1`, '--rate', '0', '--wait'], { stderr: /^blocksnap: merged \d+\/\d+ chunks/ })
    await done
    assertBytes(await readAll(vol), origin, 'origin after the live merge')
    for (const [name, s] of snaps) assertBytes(await readAll(`${vol}@${name}`), s.view, `${name} after the live merge`)
  })

  it('kill -9 of serve in the middle of a merge of s2 leaves no gateway; a restart resumes the merge', async () => {
    const served = server!
    const gateways = await gatewaysOfCluster()
    assert.equal(gateways.length, 3, `serve holds the origin and the COWs of s2 and s3 through qemu-nbd: ${gateways}`)
    await cliOk(['merge', `${vol}@s2`, '--rate', String(SLOW_RATE)])
    await logged(served, /"event":"merge-progress"[^\n]*"snapshot":"s2"/) // 10 % merged
    process.kill(served.pid!, 'SIGKILL')
    await served.exit
    assert.deepEqual(await gatewaysOfCluster(), [], 'the gateways died with serve (pdeathsig)')
    const pending = parseList(await cliOk(['list', vol, '--json'])).merge
    assert.equal(pending?.snapshot, 's2', 'the merge is recorded, not finished')
    applyMerge('s2')
    // Offline, the volume already reads as the merge will leave it.
    assertBytes(await readAll(vol), origin, 'origin offline with the merge pending')

    const restarted = await serve()
    assert.match(restarted.log, new RegExp(`${NAME}: resuming the merge of s2 at ${SLOW_RATE} bytes/s`))
    await nbdWrites(SEED + 500, 16)
    const done = logged(restarted, /merge of s2 complete/)
    await cliOk(['merge', `${vol}@s2`, '--rate', '0', '--wait'], { stderr: /^blocksnap: merged \d+\/\d+ chunks/ })
    await done
    process.kill(restarted.pid!, 'SIGTERM')
    assert.deepEqual(await restarted.exit, { code: 0, signal: null }, restarted.log)
    assert.deepEqual(await gatewaysOfCluster(), [], 'a stopped serve stops its gateways')

    assertBytes(await cluster.exportImage('origin'), origin, 'rbd export of the origin image after the merges')
    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.equal(info.merge, null)
    assert.deepEqual(info.snapshots.map((s) => s.name), ['s3'])
    assertBytes(await readAll(`${vol}@s3`), snaps.get('s3')!.view, 's3 after both merges')
    assertCowMatches(await cluster.exportImage('cow-s3'), 's3', 'rbd export of cow-s3 after the merges')
    await checkExported('final', ['s3'])
    assert.deepEqual((await cluster.listImages()).sort(), ['cow-s1', 'cow-s2', 'cow-s3', 'origin'], 'blocksnap never deletes an image it was given')
  })
})
