/**
 * RbdDevice against a real one-node Ceph cluster: the BlockDevice conformance suite (every case
 * on a fresh image of its own, through its own qemu-nbd gateway), what `rbd export` then reads,
 * the one-line errors for a missing image, a bad conf and missing tools, and a kill -9 of a
 * process holding an RbdDevice taking its gateway with it.
 */
import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdtemp, readFile, symlink } from 'node:fs/promises'
import { join } from 'node:path'
import { openDevice } from '../../src/device/open-device.js'
import { RbdDevice } from '../../src/device/rbd-device.js'
import { isSnapError } from '../../src/errors.js'
import { runBlockDeviceSuite } from '../conformance/block-device.suite.js'
import { CephCluster } from '../support/ceph.js'
import { Random } from '../support/random.js'

const cluster = await CephCluster.startForFile()
let count = 0

// Whole KiB: `rbd create --size` takes K/M/G, and qemu-nbd serves whole sectors anyway.
const SIZE = 256 * 1024 + 1024
runBlockDeviceSuite(
  'rbd-device',
  async (sizeBytes, options) => {
    const address = await cluster.createImage(`conf${count++}`, sizeBytes)
    return RbdDevice.open(address, { readOnly: options?.readOnly === true })
  },
  { discard: true, resize: false, readOnly: true, sizeBytes: SIZE },
)

/** Reads /proc/PID/stat's state: null when the process is gone, 'Z' for a zombie nobody reaped. */
async function processState(pid: number): Promise<string | null> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8')
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0] ?? null
  } catch {
    return null
  }
}

async function processName(pid: number): Promise<string | null> {
  return (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => null))?.trim() ?? null
}

async function rejectsOneLine(promise: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(isSnapError(err), `not a SnapError: ${String(err)}`)
    assert.equal(err.code, code, err.message)
    assert.match(err.message, pattern)
    assert.doesNotMatch(err.message, /\n/)
    return true
  })
}

describe('rbd-device: data, gateway and errors', () => {
  it('writes through the device are what rbd export reads, and openDevice opens rbd: addresses', async () => {
    const size = 8 * 1024 * 1024
    const address = await cluster.createImage('data', size)
    const model = new Uint8Array(size)
    const random = new Random(18)
    const device = await openDevice(address)
    assert.ok(device instanceof RbdDevice)
    assert.equal(await processName(device.gatewayPid), 'qemu-nbd')
    // Writes spanning the 4 MiB object boundary and at odd offsets.
    for (let i = 0; i < 40; i++) {
      const length = 1 + random.int(200_000)
      const offset = i === 0 ? 4 * 1024 * 1024 - 1000 : random.int(size - length)
      const data = random.bytes(length)
      await device.write(data, offset)
      model.set(data, offset)
    }
    await device.discard(1024 * 1024, 64 * 1024)
    model.fill(0, 1024 * 1024, 1024 * 1024 + 64 * 1024)
    await device.flush()
    const pid = device.gatewayPid
    await device.close()
    assert.equal(await processState(pid), null, 'close() stops the gateway')
    assert.ok((await cluster.exportImage('data')).equals(model))
  })

  it('a missing image is SNAP_NOT_FOUND in one line naming the image and qemu-nbd\'s reason', async () => {
    await rejectsOneLine(RbdDevice.open(cluster.address('nope')), 'SNAP_NOT_FOUND', /rbd:rbd\/nope.*cannot open the RBD image: error reading header from nope: No such file or directory/)
  })

  it('a missing ceph.conf is a one-line error naming the file', async () => {
    await rejectsOneLine(RbdDevice.open('rbd:rbd/x?conf=/nonexistent/ceph.conf'), 'SNAP_NOT_FOUND', /error reading conf file \/nonexistent\/ceph\.conf/)
  })

  it('a malformed address is SNAP_BAD_ARGUMENT before anything starts', async () => {
    await rejectsOneLine(openDevice('rbd:just-a-pool'), 'SNAP_BAD_ARGUMENT', /rbd:POOL\/IMAGE/)
  })

  it('missing setpriv or qemu-nbd are one-line SNAP_NOT_SUPPORTED errors saying what to install', async () => {
    const address = await cluster.createImage('tools', 1024 * 1024)
    const bin = await mkdtemp(join(cluster.dir, 'bin-'))
    await symlink('/usr/bin/setpriv', join(bin, 'setpriv'))
    const path = process.env['PATH']
    try {
      process.env['PATH'] = bin
      await rejectsOneLine(RbdDevice.open(address), 'SNAP_NOT_SUPPORTED', /qemu-nbd not found \(install qemu-utils/)
      process.env['PATH'] = join(cluster.dir, 'no-such-dir')
      await rejectsOneLine(RbdDevice.open(address), 'SNAP_NOT_SUPPORTED', /setpriv not found \(install util-linux\)/)
    } finally {
      process.env['PATH'] = path
    }
  })

  it('kill -9 of a process holding an RbdDevice leaves no qemu-nbd behind, and the flushed data is in the image', async () => {
    const address = await cluster.createImage('killed', 1024 * 1024)
    const module = new URL('../../src/device/rbd-device.ts', import.meta.url).pathname
    const script = `
      import { RbdDevice } from ${JSON.stringify(module)}
      const device = await RbdDevice.open(${JSON.stringify(address)})
      await device.write(new Uint8Array(4096).fill(0x5a), 8192)
      await device.flush()
      process.stdout.write(device.gatewayPid + '\\n')
      setInterval(() => {}, 1000)
    `
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] })
    const gatewayPid = await new Promise<number>((resolve, reject) => {
      let out = ''
      child.stdout!.on('data', (d: Buffer) => {
        out += d.toString()
        if (out.includes('\n')) resolve(Number(out.trim()))
      })
      child.once('exit', (code) => reject(new Error(`the holder exited (${code}) before opening the device`)))
    })
    assert.equal(await processName(gatewayPid), 'qemu-nbd')
    const exited = new Promise((resolve) => child.once('exit', resolve))
    process.kill(child.pid!, 'SIGKILL')
    await exited
    // The kernel delivers the parent-death signal as the parent exits; a zombie is a dead
    // process whose exit nobody collected (PID 1 here may not reap orphans).
    let state = await processState(gatewayPid)
    for (let i = 0; i < 100 && state !== null && state !== 'Z'; i++) {
      await new Promise((r) => setTimeout(r, 50))
      state = await processState(gatewayPid)
    }
    assert.ok(state === null || state === 'Z', `qemu-nbd ${gatewayPid} is still running (state ${state})`)
    const image = await cluster.exportImage('killed')
    assert.ok(image.subarray(8192, 8192 + 4096).every((b) => b === 0x5a))
    assert.ok(image.subarray(0, 8192).every((b) => b === 0))
  })
})
