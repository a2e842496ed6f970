/**
 * NbdClientDevice passes the BlockDevice conformance suite against three servers: nbdkit's
 * memory plugin, qemu-nbd on a raw file and blocksnap's own NbdServer (in-process, over a
 * MemoryDevice). Each device gets a server of its own, stopped by PID afterwards.
 */
import { after } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { NbdClientDevice } from '../../src/device/nbd-client-device.js'
import { staticExports } from '../../src/nbd/export.js'
import { runBlockDeviceSuite } from '../conformance/block-device.suite.js'
import { PeerServer } from '../support/nbd-peer.js'
import { requireTools } from '../support/nbd-tools.js'
import { startTestServer, type TestServer } from '../support/nbd-test-server.js'

await requireTools('nbdkit', 'qemu-nbd')
const dir = await mkdtemp(join(tmpdir(), 'blocksnap-nbd-client-'))
const peers: PeerServer[] = []
const ours: TestServer[] = []
let count = 0
after(async () => {
  await Promise.all(peers.map((peer) => peer.stop()))
  await Promise.all(ours.map((server) => server.close()))
  await rm(dir, { recursive: true, force: true })
})

runBlockDeviceSuite(
  'nbd-client-device (nbdkit memory)',
  async (sizeBytes, options) => {
    const peer = await PeerServer.nbdkit(join(dir, `k${count++}.sock`), ['memory', String(sizeBytes)], options?.readOnly ? ['-r'] : []).start()
    peers.push(peer)
    return NbdClientDevice.open(peer.uri())
  },
  { discard: true, resize: false, readOnly: true },
)

// qemu-nbd serves whole 512-byte sectors only, so the suite's odd size is rounded up.
const QEMU_SIZE = 256 * 1024 + 1024
runBlockDeviceSuite(
  'nbd-client-device (qemu-nbd raw)',
  async (sizeBytes, options) => {
    const file = join(dir, `q${count}.img`)
    await writeFile(file, '')
    await truncate(file, sizeBytes)
    const peer = await PeerServer.qemuNbd(join(dir, `q${count++}.sock`), file, options?.readOnly ? ['-r'] : []).start()
    peers.push(peer)
    return NbdClientDevice.open(peer.uri())
  },
  { discard: true, resize: false, readOnly: true, sizeBytes: QEMU_SIZE },
)

runBlockDeviceSuite(
  'nbd-client-device (blocksnap NbdServer)',
  async (sizeBytes, options) => {
    const device = new MemoryDevice(sizeBytes, options)
    const server = await startTestServer({ exports: staticExports([{ name: 'mem', device, readOnly: options?.readOnly === true }]) }, { path: join(dir, `b${count++}.sock`) })
    ours.push(server)
    return NbdClientDevice.open(`nbd+unix:///mem?socket=${join(dir, `b${count - 1}.sock`)}`)
  },
  { discard: true, resize: false, readOnly: true },
)

// A server that refuses anything not aligned to 4 KiB: unaligned device I/O must become aligned
// requests with read-modify-write at the edges, or the suite's odd offsets fail with EINVAL.
runBlockDeviceSuite(
  'nbd-client-device (nbdkit, 4 KiB minimum block)',
  async (sizeBytes, options) => {
    const peer = await PeerServer.nbdkit(
      join(dir, `p${count++}.sock`),
      [
        'memory',
        String(sizeBytes),
        'blocksize-minimum=4096',
        'blocksize-preferred=65536',
        'blocksize-maximum=65536',
        'blocksize-error-policy=error',
      ],
      ['--filter=blocksize-policy', ...(options?.readOnly ? ['-r'] : [])],
    ).start()
    peers.push(peer)
    const device = await NbdClientDevice.open(peer.uri())
    assert.equal(device.info.minBlockBytes, 4096)
    return device
  },
  { discard: true, resize: false, readOnly: true, sizeBytes: 256 * 1024 + 4096 },
)
