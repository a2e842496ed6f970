/**
 * Issue 17 items 3 and 4 over NBD, with libnbd's tools as the peer: base:allocation reports
 * holes exactly where a sparse origin was never written (and never a hole where it was, also for
 * writes after the map was cached); snapshots report their exceptions plus the origin's data;
 * the origin offers qemu:dirty-bitmap:SNAP per snapshot, listing the chunks written since SNAP
 * (plus chunks written on SNAP itself: a documented superset); nbdcopy of a sparse export moves
 * only the data. In process: a real Volume served by an NbdServer through VolumeExports; seeded
 * byte-granular models.
 */
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { VolumeExports } from '../../src/cli/volume-exports.js'
import { Volume } from '../../src/volume/volume.js'
import { requireTools, runOk } from '../support/nbd-tools.js'
import { type TestServer, logsAreClean, startTestServer } from '../support/nbd-test-server.js'
import { Random } from '../support/random.js'

const TIMEOUT = 120_000
const KiB = 1024
const MiB = 1024 * KiB
const SIZE = 16 * MiB
const BLOCK = 4096

let T = ''
let volume: Volume
let srv: TestServer
const uri = (name: string) => `nbd://127.0.0.1:${srv.port}/${name}`

before(async () => {
  await requireTools('nbdinfo', 'nbdcopy')
  T = await mkdtemp(join(tmpdir(), 'blocksnap-dirty-bitmap-'))
  await Volume.create(join(T, 'v'), { sizeBytes: SIZE })
  volume = await Volume.open(join(T, 'v'))
  srv = await startTestServer({ exports: new VolumeExports([volume]) })
})

after(async () => {
  await srv?.close()
  await volume?.close()
  if (T) await rm(T, { recursive: true, force: true })
  assert.ok(logsAreClean(srv.logs), `logs have no stack traces:\n${srv.logs.join('\n')}`)
})

/** Units of `unit` bytes over the volume, marked when touched. */
class Touched {
  readonly bits = new Uint8Array(Math.ceil(SIZE / BLOCK))
  readonly unit: number
  constructor(unit: number) {
    this.unit = unit
  }
  mark(offset: number, length: number): void {
    for (let u = Math.floor(offset / this.unit); u * this.unit < offset + length; u++) {
      for (let b = (u * this.unit) / BLOCK; b < ((u + 1) * this.unit) / BLOCK; b++) this.bits[b] = 1
    }
  }
  or(other: Touched): Touched {
    const out = new Touched(BLOCK)
    for (let i = 0; i < this.bits.length; i++) out.bits[i] = this.bits[i]! | other.bits[i]!
    return out
  }
  ranges(): Array<[number, number]> {
    const out: Array<[number, number]> = []
    for (let b = 0; b < this.bits.length; b++) {
      if (!this.bits[b]) continue
      const last = out[out.length - 1]
      if (last && last[1] === b * BLOCK) last[1] += BLOCK
      else out.push([b * BLOCK, (b + 1) * BLOCK])
    }
    return out
  }
}

/** nbdinfo --map[=context]: the ranges whose flags satisfy `pick`, merged; checks full coverage. */
async function mapRanges(name: string, context: string | null, pick: (flags: number) => boolean): Promise<Array<[number, number]>> {
  const { stdout } = await runOk('nbdinfo', [context ? `--map=${context}` : '--map', uri(name)])
  const out: Array<[number, number]> = []
  let covered = 0
  for (const line of stdout.trim().split('\n')) {
    const [offset, length, flags] = line.trim().split(/\s+/).map(Number) as [number, number, number]
    assert.equal(offset, covered, `map of ${name} ${context ?? 'base:allocation'} is contiguous`)
    covered += length
    if (!pick(flags)) continue
    const last = out[out.length - 1]
    if (last && last[1] === offset) last[1] += length
    else out.push([offset, offset + length])
  }
  assert.equal(covered, SIZE, 'the map covers the export')
  return out
}
const isData = (flags: number) => (flags & 1) === 0
const isDirty = (flags: number) => (flags & 1) === 1

async function write(device: string | null, offset: number, length: number, fill: number): Promise<void> {
  await volume.device(device).write(new Uint8Array(length).fill(fill), offset)
}

test('base:allocation and qemu:dirty-bitmap against models; writes after a cached map show at once; nbdcopy copies only data', { timeout: TIMEOUT }, async () => {
  const rnd = new Random(4242)
  const randomWrite = () => {
    const length = 1 + rnd.int(20 * KiB)
    return { offset: rnd.int(SIZE - length), length }
  }
  const originData = new Touched(BLOCK)
  for (let i = 0; i < 15; i++) {
    const { offset, length } = randomWrite()
    await write(null, offset, length, 1)
    originData.mark(offset, length)
  }
  await volume.createSnapshot('s1', { chunkSizeBytes: 4 * KiB })
  const dirty1 = new Touched(4 * KiB)
  const s1Exceptions = new Touched(4 * KiB)
  for (let i = 0; i < 12; i++) {
    const { offset, length } = randomWrite()
    await write(null, offset, length, 2)
    originData.mark(offset, length)
    dirty1.mark(offset, length)
  }
  await volume.createSnapshot('s2', { chunkSizeBytes: 64 * KiB })
  const dirty2 = new Touched(64 * KiB)
  for (let i = 0; i < 12; i++) {
    const { offset, length } = randomWrite()
    const onS1 = i % 4 === 0
    await write(onS1 ? 's1' : null, offset, length, 3)
    if (onS1) s1Exceptions.mark(offset, length)
    else {
      originData.mark(offset, length)
      dirty2.mark(offset, length)
    }
    // A write to s1 makes an exception there too: reported dirty (superset, see block-maps.ts).
    dirty1.mark(offset, length)
  }
  await volume.origin.flush()

  const list = await runOk('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${srv.port}`])
  const origin = (JSON.parse(list.stdout).exports as Array<{ 'export-name': string; contexts: string[] }>).find((e) => e['export-name'] === 'v')!
  assert.deepEqual(origin.contexts, ['base:allocation', 'qemu:dirty-bitmap:s1', 'qemu:dirty-bitmap:s2'])

  assert.deepEqual(await mapRanges('v', 'qemu:dirty-bitmap:s1', isDirty), dirty1.ranges(), 'dirty bitmap s1 (4 KiB chunks)')
  assert.deepEqual(await mapRanges('v', 'qemu:dirty-bitmap:s2', isDirty), dirty2.ranges(), 'dirty bitmap s2 (64 KiB chunks)')
  assert.deepEqual(await mapRanges('v', null, isData), originData.ranges(), 'origin allocation: holes exactly where never written')
  // s1 holds its exceptions (copy-outs since s1, and its own writes) and reads the rest from the origin.
  assert.deepEqual(await mapRanges('v@s1', null, isData), originData.or(dirty1).or(s1Exceptions).ranges(), 's1 allocation')

  // Writes into holes after the map was cached: never reported as holes.
  for (let i = 0; i < 5; i++) {
    const offset = rnd.int(SIZE / BLOCK - 2) * BLOCK + 100
    await write(null, offset, 3000, 4)
    originData.mark(offset, 3000)
    dirty1.mark(offset, 3000)
    dirty2.mark(offset, 3000)
    assert.deepEqual(await mapRanges('v', null, isData), originData.ranges(), `origin allocation after write ${i}`)
  }
  assert.deepEqual(await mapRanges('v', 'qemu:dirty-bitmap:s2', isDirty), dirty2.ranges(), 'dirty bitmap s2 after more writes')

  // nbdcopy with zero detection off (--sparse=0) skips only what block status calls holes; 4 KiB
  // requests, so a request partly over data does not copy a whole 256 KiB default request.
  const target = join(T, 'copy.img')
  await runOk('nbdcopy', ['--sparse=0', '--request-size=4096', uri('v'), target])
  const copied = await readFile(target)
  assert.ok(Buffer.from(await volume.origin.read(0, SIZE)).equals(copied), 'the copy equals the origin')
  const dataBytes = originData.ranges().reduce((n, [s, e]) => n + e - s, 0)
  const allocated = Number((await stat(target)).blocks) * 512
  assert.ok(allocated <= dataBytes + 64 * KiB, `the copy holds ${allocated} bytes for ${dataBytes} bytes of data (of ${SIZE})`)
  assert.ok(allocated >= dataBytes, `the copy holds all ${dataBytes} bytes of data (${allocated})`)
})

test('a removed snapshot is no longer offered as a dirty bitmap', { timeout: TIMEOUT }, async () => {
  await volume.createSnapshot('gone')
  let list = await runOk('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${srv.port}`])
  const contexts = () => (JSON.parse(list.stdout).exports as Array<{ 'export-name': string; contexts: string[] }>).find((e) => e['export-name'] === 'v')!.contexts
  assert.ok(contexts().includes('qemu:dirty-bitmap:gone'))
  await volume.removeSnapshot('gone')
  list = await runOk('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${srv.port}`])
  assert.ok(!contexts().includes('qemu:dirty-bitmap:gone'))
})
