/**
 * RbdDevice against a real one-node Ceph cluster: the BlockDevice conformance suite (every case
 * on a fresh image of its own, through its own qemu-nbd gateway), what `rbd export` then reads,
 * the one-line errors for a missing image, a bad conf and missing tools, and a kill -9 of a
 * process holding an RbdDevice taking its gateway with it.
 */
import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, readFile, readdir, symlink, writeFile } from 'node:fs/promises'
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

/** Live qemu-nbd processes whose command line names `conf`. */
async function gatewaysOf(conf: string): Promise<number[]> {
  const pids: number[] = []
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    const cmdline = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '')
    const state = await processState(Number(entry))
    if (cmdline.startsWith('qemu-nbd\0') && cmdline.includes(conf) && state !== null && state !== 'Z') pids.push(Number(entry))
  }
  return pids
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

  it('a cluster that does not answer is SNAP_IO after the start timeout, and the gateway is stopped', async () => {
    const conf = join(cluster.dir, 'nobody.conf')
    // A monitor address nothing listens on: librados retries for minutes (client_mount_timeout).
    await writeFile(conf, '[global]\nmon host = 127.0.0.1:9\nauth client required = none\n')
    const before = await gatewaysOf(conf)
    assert.deepEqual(before, [])
    await rejectsOneLine(RbdDevice.open(`rbd:rbd/x?conf=${conf}`, { startTimeoutMs: 1500 }), 'SNAP_IO', /did not open the image within 2 s \(is the Ceph cluster reachable\?\)/)
    assert.deepEqual(await gatewaysOf(conf), [], 'the gateway that never opened the image is stopped')
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
    const tmp = await mkdtemp(join(cluster.dir, 'tmp-'))
    const holder = await startHolder(address, tmp, 'hold')
    assert.equal(await processName(holder.gatewayPid), 'qemu-nbd')
    assert.deepEqual(await gatewayDirs(tmp), [`blocksnap-rbd-${holder.child.pid}`])
    const exited = new Promise((resolve) => holder.child.once('exit', resolve))
    process.kill(holder.child.pid!, 'SIGKILL')
    await exited
    // The kernel delivers the parent-death signal as the parent exits; a zombie is a dead
    // process whose exit nobody collected (PID 1 here may not reap orphans).
    let state = await processState(holder.gatewayPid)
    for (let i = 0; i < 100 && state !== null && state !== 'Z'; i++) {
      await new Promise((r) => setTimeout(r, 50))
      state = await processState(holder.gatewayPid)
    }
    assert.ok(state === null || state === 'Z', `qemu-nbd ${holder.gatewayPid} is still running (state ${state})`)
    const image = await cluster.exportImage('killed')
    assert.ok(image.subarray(8192, 8192 + 4096).every((b) => b === 0x5a))
    assert.ok(image.subarray(0, 8192).every((b) => b === 0))

    // The killed holder's socket directory is left; the next process's first gateway removes it,
    // and a process that exits without closing its device removes its own.
    assert.deepEqual(await gatewayDirs(tmp), [`blocksnap-rbd-${holder.child.pid}`])
    const next = await startHolder(address, tmp, 'exit')
    await new Promise((resolve) => (next.child.exitCode !== null ? resolve(null) : next.child.once('exit', resolve)))
    assert.equal(next.child.exitCode, 0)
    assert.deepEqual(await gatewayDirs(tmp), [])
  })
})

/** `blocksnap-rbd-PID` of each gateway socket directory in `dir`. */
async function gatewayDirs(dir: string): Promise<string[]> {
  return (await readdir(dir)).filter((n) => n.startsWith('blocksnap-rbd-')).map((n) => n.replace(/-[^-]*$/, ''))
}

/**
 * A child process that opens an RbdDevice on `address` (its gateway directory under `tmp`),
 * writes and flushes 4 KiB of 0x5a at 8192, reports the gateway PID, then holds the device
 * ('hold') or exits at once without closing it ('exit').
 */
async function startHolder(address: string, tmp: string, mode: 'hold' | 'exit'): Promise<{ child: ChildProcess; gatewayPid: number }> {
  const module = new URL('../../src/device/rbd-device.ts', import.meta.url).pathname
  const script = `
    import { RbdDevice } from ${JSON.stringify(module)}
    const device = await RbdDevice.open(${JSON.stringify(address)})
    await device.write(new Uint8Array(4096).fill(0x5a), 8192)
    await device.flush()
    process.stdout.write(device.gatewayPid + '\\n', () => ${mode === 'exit' ? 'process.exit(0)' : 'setInterval(() => {}, 1000)'})
  `
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, TMPDIR: tmp },
  })
  const gatewayPid = await new Promise<number>((resolve, reject) => {
    let out = ''
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString()
      if (out.includes('\n')) resolve(Number(out.trim()))
    })
    child.once('exit', (code) => (out.includes('\n') ? resolve(Number(out.trim())) : reject(new Error(`the holder exited (${code}) before opening the device`))))
  })
  return { child, gatewayPid }
}
