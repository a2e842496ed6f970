/**
 * Volumes on any device (issue 18 item 2), through the compiled CLI against real NBD servers:
 * an origin and a COW on qemu-nbd exports of raw files (so the bytes can be read behind the
 * server), an origin on nbdkit `memory`, and a small fixed COW on nbdkit `memory`.
 *
 * diff reads both views through the devices and lists the same extents as on files.
 *
 * Every result is checked against an independent model (byte arrays updated by the test) or the
 * raw files themselves: the COW an NBD server holds is byte-for-byte the COW blocksnap makes in a
 * file for the same operations, i.e. the kernel's format.
 */
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { basename, join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { PeerServer } from '../support/nbd-peer.js'
import { Random } from '../support/random.js'
import { assertBytes, assertError, cli, cliOk, MERGE_PROGRESS_LINE, parseList, pattern } from './helpers.js'

const KiB = 1024
const MiB = 1024 * KiB
const SEED = 1802
let T = ''
const peers: PeerServer[] = []
let savedStateDir: string | undefined

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-remote-devices-'))
  savedStateDir = process.env.BLOCKSNAP_STATE_DIR
  process.env.BLOCKSNAP_STATE_DIR = join(T, 'state') // inherited by the CLI processes
})

after(async () => {
  for (const peer of peers) await peer.stop()
  if (savedStateDir === undefined) delete process.env.BLOCKSNAP_STATE_DIR
  else process.env.BLOCKSNAP_STATE_DIR = savedStateDir
  if (T) await rm(T, { recursive: true, force: true })
})

async function qemuNbd(name: string, file: string): Promise<PeerServer> {
  const peer = await PeerServer.qemuNbd(join(T, `${name}.sock`), file).start()
  peers.push(peer)
  return peer
}

async function nbdkitMemory(name: string, sizeBytes: number): Promise<PeerServer> {
  const peer = await PeerServer.nbdkit(join(T, `${name}.sock`), ['memory', String(sizeBytes)]).start()
  peers.push(peer)
  return peer
}

/** Writes `data` at `offset` of `device` through the CLI and into `model`. */
async function write(device: string, offset: number, data: Buffer, model: Buffer, options: { stderr?: RegExp } = {}): Promise<void> {
  const input = join(T, 'input.bin')
  await writeFile(input, data)
  await cliOk(['write', device, '--offset', String(offset), '--input', input], options.stderr ? { stderr: options.stderr } : {})
  data.copy(model, offset)
}

async function readAll(device: string, sizeBytes: number): Promise<Buffer> {
  return cliOk(['read', device, '--offset', '0', '--length', String(sizeBytes)])
}

function header(bytes: Uint8Array): { magic: number; valid: number; version: number; chunkSizeSectors: number } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, 16)
  return { magic: view.getUint32(0, true), valid: view.getUint32(4, true), version: view.getUint32(8, true), chunkSizeSectors: view.getUint32(12, true) }
}

describe('a volume whose origin and COW are NBD exports', () => {
  it('reads and writes against a model, keeps the kernel COW format on the server, and merges into the NBD origin', async () => {
    const originBytes = 4 * MiB
    const cowBytes = 1 * MiB
    const origin = pattern(originBytes, SEED)
    await writeFile(join(T, 'origin.raw'), origin)
    await writeFile(join(T, 'origin-copy.raw'), origin)
    // The COW device starts with foreign bytes in its first sector (not a COW header): they are
    // replaced by a fresh header, as lvcreate zeroes the start of a new snapshot's COW.
    const cowInit = Buffer.alloc(cowBytes)
    pattern(512, SEED + 1).copy(cowInit)
    await writeFile(join(T, 'cow.raw'), cowInit)
    const originPeer = await qemuNbd('origin', join(T, 'origin.raw'))
    const cowPeer = await qemuNbd('cow', join(T, 'cow.raw'))
    const vol = join(T, 'nbdvol')
    const fileVol = join(T, 'filevol') // the same operations on a volume of files
    await cliOk(['create', vol, '--origin', originPeer.uri()])
    await cliOk(['create', fileVol, '--from', join(T, 'origin-copy.raw')])
    await cliOk(['snapshot', `${vol}@s`, '--cow', cowPeer.uri()])
    await cliOk(['snapshot', `${fileVol}@s`, '--cow-size', String(cowBytes)])

    const list = parseList(await cliOk(['list', vol, '--json']))
    assert.equal(list.originPath, originPeer.uri())
    assert.equal(list.originExternal, true)
    assert.equal(list.sizeBytes, originBytes, 'the size comes from the device')
    const snap = list.snapshots[0]!
    assert.deepEqual(
      { cowPath: snap.cowPath, cowExternal: snap.cowExternal, cowSizeBytes: snap.cowSizeBytes, cowCapacityBytes: snap.cowCapacityBytes, warnAtPercent: (snap as unknown as { warnAtPercent: number }).warnAtPercent },
      { cowPath: cowPeer.uri(), cowExternal: true, cowSizeBytes: cowBytes, cowCapacityBytes: cowBytes, warnAtPercent: 80 },
      'a COW on a device is fixed at its size, with the default fill warning',
    )

    const originModel = Buffer.from(origin)
    const snapModel = Buffer.from(origin)
    const random = new Random(SEED)
    for (let i = 0; i < 6; i++) {
      const length = (1 + random.int(16)) * 512
      const offset = random.int((originBytes - length) / 512) * 512
      const data = pattern(length, SEED + 10 + i)
      await write(vol, offset, data, originModel)
      await write(fileVol, offset, data, Buffer.from(originModel))
    }
    // A write to the snapshot itself lands in its COW only.
    const snapWrite = pattern(3000, SEED + 99)
    await write(`${vol}@s`, 5000, snapWrite, snapModel)
    await write(`${fileVol}@s`, 5000, snapWrite, Buffer.from(snapModel))
    assertBytes(await readAll(vol, originBytes), originModel, 'origin read through the CLI')
    assertBytes(await readAll(`${vol}@s`, originBytes), snapModel, 'snapshot read through the CLI')
    assertBytes(await readFile(join(T, 'origin.raw')), originModel, 'the raw file behind the origin export')

    await cliOk(['check', vol])
    const dump = JSON.parse((await cliOk(['dump', `${vol}@s`, '--json'])).toString()) as { cowPath: string; header: unknown; exceptions: number; complete: boolean }
    const fileDump = JSON.parse((await cliOk(['dump', `${fileVol}@s`, '--json'])).toString()) as { exceptions: number }
    assert.equal(dump.cowPath, cowPeer.uri())
    assert.deepEqual(dump.header, { magic: 'SnAp', valid: true, version: 1, chunkSizeSectors: 8 })
    assert.equal(dump.complete, true)
    assert.equal(dump.exceptions, fileDump.exceptions)
    assert.ok(dump.exceptions > 0)
    const cowRaw = await readFile(join(T, 'cow.raw'))
    assert.deepEqual(header(cowRaw), { magic: 0x70416e53, valid: 1, version: 1, chunkSizeSectors: 8 })
    assertBytes(cowRaw, await readFile(join(fileVol, 'snapshots', 's.cow')), 'the COW on the NBD server against the COW file of the same operations')

    // The COW the volume already uses is refused, under another spelling of the same export too.
    const again = `nbd+unix:///?socket=${join(T, '.', 'x', '..', 'cow.sock').replace('/x/..', '/./x/..')}`
    for (const address of [cowPeer.uri(), again]) {
      assertError(await cli(['snapshot', `${vol}@t`, '--cow', address]), 4, /\[SNAP_BUSY\]: COW nbd\+unix:.* is already used by snapshot 's' of volume nbdvol$/m)
    }
    assertError(await cli(['snapshot', `${vol}@t`, '--cow', originPeer.uri()]), 1, /is the origin of volume nbdvol/)

    // diff reads both views through the devices: the same extents as on the volume of files, and
    // exactly the bytes where the two models differ.
    const diffOf = async (v: string) => JSON.parse((await cliOk(['diff', `${v}@s`, v, '--json'])).toString()) as { changedBytes: number; granularityBytes: number; extents: Array<{ offset: number; length: number }> }
    const nbdDiff = await diffOf(vol)
    const fileDiff = await diffOf(fileVol)
    assert.deepEqual([nbdDiff.granularityBytes, nbdDiff.changedBytes, nbdDiff.extents], [fileDiff.granularityBytes, fileDiff.changedBytes, fileDiff.extents])
    assert.ok(nbdDiff.changedBytes > 0)
    for (let at = 0; at < originBytes; at += nbdDiff.granularityBytes) {
      const differs = !originModel.subarray(at, at + nbdDiff.granularityBytes).equals(snapModel.subarray(at, at + nbdDiff.granularityBytes))
      const listed = nbdDiff.extents.some((e) => at >= e.offset && at < e.offset + e.length)
      assert.equal(listed, differs, `diff at ${at}`)
    }

    const merged = await cli(['merge', `${vol}@s`])
    assert.equal(merged.code, 0, merged.stderr)
    for (const line of merged.stderr.split('\n').filter(Boolean)) assert.match(line, MERGE_PROGRESS_LINE)
    assertBytes(await readFile(join(T, 'origin.raw')), snapModel, 'the origin file behind the export after the merge')
    assert.equal(parseList(await cliOk(['list', vol, '--json'])).snapshots.length, 0)

    // The merged COW still holds its header: reusing the device is refused until it is wiped.
    assertError(await cli(['snapshot', `${vol}@u`, '--cow', cowPeer.uri()]), 4, /COW device nbd\+unix:.* already holds a snapshot COW header/)
    const wiped = await readFile(join(T, 'cow.raw'))
    wiped.fill(0, 0, 512)
    await writeFile(join(T, 'cow.raw'), wiped)
    await cliOk(['snapshot', `${vol}@u`, '--cow', cowPeer.uri()])
    const removed = JSON.parse((await cliOk(['remove', `${vol}@u`, '--json'])).toString()) as { removed: { cowPath: string; cowDeleted: boolean } }
    assert.deepEqual(removed.removed, { name: 'u', cowPath: cowPeer.uri(), cowDeleted: false })
    assert.equal(header(await readFile(join(T, 'cow.raw'))).magic, 0x70416e53, 'remove leaves the device alone')
  })
})

describe('a fixed COW on an NBD device', () => {
  it('fills and overflows exactly as a fixed-size COW file does: fill warnings, then invalid with a loud warning', async () => {
    const originBytes = 1 * MiB
    const cowBytes = 64 * KiB
    const originPeer = await nbdkitMemory('mem-origin', originBytes)
    const cowPeer = await nbdkitMemory('mem-cow', cowBytes)
    const vol = join(T, 'memvol')
    const fileVol = join(T, 'memfilevol')
    await cliOk(['create', vol, '--origin', originPeer.uri()])
    await cliOk(['create', fileVol, '--size', String(originBytes)])
    await cliOk(['snapshot', `${vol}@s`, '--cow', cowPeer.uri()])
    await cliOk(['snapshot', `${fileVol}@s`, '--cow-size', String(cowBytes)])
    const model = Buffer.alloc(originBytes)
    const stderrOf = async (volume: string, offset: number, data: Buffer) => {
      const input = join(T, 'fill.bin')
      await writeFile(input, data)
      const r = await cli(['write', volume, '--offset', String(offset), '--input', input])
      assert.equal(r.code, 0, r.stderr)
      return r.stderr.replaceAll(cowPeer.uri(), 'COW').replaceAll(join(fileVol, 'snapshots', 's.cow'), 'COW').replaceAll(volume, 'VOL').replaceAll(basename(volume), 'VOL')
    }
    // 64 KiB with 4 KiB chunks: header, one area, 14 data chunks. Eleven make it 81 % full (the
    // first warning), the next ten do not fit.
    const steps: Array<[number, Buffer]> = [[0, pattern(44 * KiB, SEED + 5)], [44 * KiB, pattern(40 * KiB, SEED + 6)]]
    const warnings: string[] = []
    for (const [i, [offset, data]] of steps.entries()) {
      const nbd = await stderrOf(vol, offset, data)
      const file = await stderrOf(fileVol, offset, data)
      assert.equal(nbd, file, `step ${i}: the same warnings as a fixed COW file`)
      data.copy(model, offset)
      warnings.push(nbd)
    }
    assert.match(warnings.join(''), /^blocksnap: warning: .*80/m, 'a fill warning')
    assert.match(warnings[1]!, /^blocksnap: warning: snapshot VOL@s is now invalid: COW full$/m)
    const states = async (v: string) =>
      (JSON.parse((await cliOk(['list', v, '--json'])).toString()) as { snapshots: Array<{ state: string; dataPercent: number }> }).snapshots.map((s) => [s.state, s.dataPercent])
    assert.deepEqual(await states(vol), await states(fileVol))
    assert.equal((await states(vol))[0]![0], 'invalid')
    assertBytes(await readAll(vol, originBytes), model, 'origin writes went through')
    assertError(await cli(['read', `${vol}@s`, '--offset', '0', '--length', '512']), 1, /SNAP_INVALID/)
    // check on the COW device sees what check sees on the file: a header marked invalid.
    const nbdCheck = await cli(['check', vol])
    const fileCheck = await cli(['check', fileVol])
    assert.equal(nbdCheck.code, 3)
    const said = (r: { stdout: Buffer; stderr: string }, v: string) => (r.stdout.toString() + r.stderr).replaceAll(v, 'VOL').replaceAll(basename(v), 'VOL')
    assert.equal(said(nbdCheck, vol), said(fileCheck, fileVol))
    assert.match(said(nbdCheck, vol), /marked invalid/)
  })
})

describe('device addresses that are refused', () => {
  it('refuses malformed and secret-bearing URIs with one line, and creates nothing', async () => {
    const vol = join(T, 'refused')
    const cases: Array<[string, RegExp]> = [
      ['nbd+unix:///export', /need \?socket=PATH/],
      ['nbd+unix:///?socket=/x&sock=/y', /unknown query parameter 'sock'/],
      ['nbd+unx:///?socket=/x', /unknown URI scheme 'nbd\+unx:'/],
      ['nbds://alice:hunter2@example.invalid/disk', /must not carry a password/],
    ]
    for (const [address, why] of cases) {
      const stderr = assertError(await cli(['create', vol, '--origin', address]), 1, why)
      assert.doesNotMatch(stderr, /hunter2/, 'a secret is never echoed')
      assert.equal(await stat(vol).catch(() => null), null, `${address}: no volume directory left`)
    }
    await cliOk(['create', vol, '--size', '1M'])
    assertError(await cli(['snapshot', `${vol}@s`, '--cow', 'nbd://']), 1, /SNAP_BAD_ARGUMENT/)
    assertError(await cli(['snapshot', `${vol}@s`, '--cow', 'nbd+unix:///?socket=/nonexistent/s.sock']), 1)
    assert.equal(parseList(await cliOk(['list', vol, '--json'])).snapshots.length, 0)
  })
})
