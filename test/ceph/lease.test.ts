/**
 * The volume lease (src/volume/volume-lease.ts) against a real one-node Ceph cluster: contenders
 * in separate processes (each its own RADOS clients, as on two hosts), an owner killed or
 * stalled, and a takeover that must fence the old owner's gateway before anything else.
 *
 * Verdicts wait on observable states (a line from a holder, its exit code, the lock and
 * heartbeat on the cluster, the OSD blocklist), never on a sleep being long enough.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { type ChildProcessByStdio, spawn } from 'node:child_process'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import type { Readable } from 'node:stream'
import { parseRbdAddress } from '../../src/device/rbd/rbd-address.js'
import { CephOps } from '../../src/device/rbd/ceph-ops.js'
import { LEASE_LOCK, VolumeLease, leaseObjectOf } from '../../src/volume/volume-lease.js'
import { isSnapError } from '../../src/errors.js'
import { checkVolumeFiles } from '../../src/volume/check.js'
import { Volume } from '../../src/volume/volume.js'
import { CephCluster } from '../support/ceph.js'
import { run } from '../support/nbd-tools.js'

const REPO = new URL('../..', import.meta.url).pathname
const HOLDER = join(REPO, 'test', 'support', 'lease-holder.ts')
const LEASE_SECONDS = 2
const MiB = 1024 * 1024

const cluster = await CephCluster.startForFile()
const ops = new CephOps({ pool: cluster.pool, confFile: cluster.conf, clientId: null })

/** A lease-holder.ts process: another host's owner. */
class Holder {
  readonly child: ChildProcessByStdio<null, Readable, Readable>
  readonly lines: string[] = []
  readonly exit: Promise<number | null>
  private readonly waiters: (() => void)[] = []
  stderr = ''

  constructor(address: string, volume: string, mode: 'wait' | 'takeover' | 'local' = 'wait') {
    this.child = spawn(process.execPath, ['--import', 'tsx', HOLDER, address, volume, String(LEASE_SECONDS), mode], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] })
    this.child.stderr.on('data', (d: Buffer) => (this.stderr += d.toString('utf8')))
    createInterface({ input: this.child.stdout }).on('line', (line) => {
      this.lines.push(line)
      for (const w of this.waiters.splice(0)) w()
    })
    this.exit = new Promise((resolve) => this.child.once('exit', (code, signal) => resolve(code ?? (signal ? -1 : null))))
  }

  /** The first line starting with `prefix`; rejects if the process exits without one. */
  async line(prefix: string, timeoutMs = 60_000): Promise<string> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const found = this.lines.find((l) => l.startsWith(prefix))
      if (found !== undefined) return found
      if (this.child.exitCode !== null || this.child.signalCode !== null) {
        throw new Error(`holder exited (${this.child.exitCode ?? this.child.signalCode}) without '${prefix}': ${this.lines.join(' | ')} ${this.stderr}`)
      }
      if (Date.now() > deadline) throw new Error(`holder printed no '${prefix}' within ${timeoutMs} ms: ${this.lines.join(' | ')}`)
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve)
        setTimeout(resolve, 200)
      })
    }
  }

  /** The first line, whatever it says (held, busy, error). */
  async first(): Promise<string> {
    return this.line('')
  }

  kill(signal: NodeJS.Signals = 'SIGKILL'): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal)
  }
}

async function lockToken(object: string): Promise<string | null> {
  return (await ops.lockInfo(object, LEASE_LOCK))[0]?.cookie ?? null
}

async function heartbeatCounter(object: string, token: string): Promise<number | null> {
  const text = await ops.getXattr(object, `blocksnap.heartbeat.${token}`)
  return text === null ? null : (JSON.parse(text) as { counter: number }).counter
}

/** Resolves once `fn` returns true; fails after `limitMs` (generous: a verdict, not a timing). */
async function until(what: string, fn: () => Promise<boolean>, limitMs = 60_000): Promise<void> {
  const deadline = Date.now() + limitMs
  while (!(await fn())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

/** A qemu-nbd gateway on `image` started by hand: the old owner's RADOS client. */
async function startGateway(image: string, dir: string): Promise<{ uri: string; stop: () => void }> {
  const socket = join(dir, `gw-${image}-${Date.now()}.sock`)
  const child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', 'qemu-nbd', '-t', '-f', 'raw', '--cache=none', `--socket=${socket}`, `rbd:${cluster.pool}/${image}:conf=${cluster.conf}`], { stdio: 'ignore' })
  const uri = `nbd+unix:///?socket=${socket}`
  await until(`qemu-nbd on ${image}`, async () => (await run('nbdinfo', ['--size', uri], { timeoutMs: 10_000 })).code === 0)
  return { uri, stop: () => child.kill('SIGKILL') }
}

/** Writes `byte` over [offset, offset+length) through an NBD URI, flushing; the tool's exit code. */
async function nbdWrite(uri: string, offset: number, length: number, byte: number): Promise<{ code: number; stderr: string }> {
  const r = await run('nbdsh', ['-u', uri, '-c', `h.pwrite(bytes([${byte}]) * ${length}, ${offset}); h.flush()`], { timeoutMs: 60_000 })
  return { code: r.code, stderr: r.stderr }
}

test('two contenders at once: exactly one takes the lease, the other is refused naming the owner while it renews', async () => {
  await cluster.createImage('race', MiB)
  const address = cluster.address('race')
  const object = leaseObjectOf(parseRbdAddress(address))
  for (let round = 0; round < 3; round++) {
    const a = new Holder(address, `/vol/race-a${round}`)
    const b = new Holder(address, `/vol/race-b${round}`)
    try {
      const [la, lb] = await Promise.all([a.first(), b.first()])
      const outcomes = [la, lb].map((l) => l.split(' ')[0]).sort()
      assert.deepEqual(outcomes, ['busy', 'held'], `round ${round}: ${la} | ${lb}`)
      const [winner, loser, loserLine] = la.startsWith('held') ? [a, b, lb] : [b, a, la]
      const token = (await winner.line('held ')).split(' ')[1] as string
      assert.equal(await lockToken(object), token)
      assert.match(loserLine, new RegExp(`pid ${winner.child.pid}\\b`))
      assert.match(loserLine, /--takeover/)
      assert.equal(await loser.exit, 4)
      // The winner was never disturbed: its lease is still its own, and it keeps renewing.
      const before = (await heartbeatCounter(object, token)) as number
      await until('the winner to renew', async () => ((await heartbeatCounter(object, token)) ?? -1) > before)
      assert.equal(await lockToken(object), token)
    } finally {
      a.kill()
      b.kill()
      await Promise.all([a.exit, b.exit])
    }
    // The killed winner's lease is left behind: the next round must find it dead before taking it.
    const left = await lockToken(object)
    if (left !== null) {
      const next = await VolumeLease.acquire(parseRbdAddress(address), '/vol/cleaner', () => [], { leaseSeconds: LEASE_SECONDS })
      await next.release()
    }
    assert.equal(await lockToken(object), null)
  }
})

test('an owner killed with SIGKILL is judged dead after 1.5 leases of silence, fenced, and its lease taken', async () => {
  await cluster.createImage('dead', MiB)
  const address = cluster.address('dead')
  const origin = parseRbdAddress(address)
  const object = leaseObjectOf(origin)
  const a = new Holder(address, '/vol/dead')
  const oldToken = (await a.line('held ')).split(' ')[1] as string
  await until('a renewal', async () => ((await heartbeatCounter(object, oldToken)) ?? 0) > 0)
  a.kill('SIGKILL')
  await a.exit
  const notices: string[] = []
  const started = performance.now()
  const lease = await VolumeLease.acquire(origin, '/vol/dead', () => [origin], { leaseSeconds: LEASE_SECONDS, onNotice: (m) => notices.push(m) })
  try {
    const waitedMs = performance.now() - started
    // Never sooner: a live owner renews at least every lease/3, so 1.5 leases of silence is death.
    assert.ok(waitedMs >= 1500 * LEASE_SECONDS, `took the lease after ${waitedMs} ms`)
    assert.ok(notices.some((n) => /renewed nothing/.test(n)), notices.join(' | '))
    assert.equal(await lockToken(object), lease.token)
    assert.equal(await heartbeatCounter(object, oldToken), null, 'the dead owner\'s heartbeat is gone')
    assert.notEqual(await heartbeatCounter(object, lease.token), null)
    await lease.assertHeld()
  } finally {
    await lease.release()
  }
  assert.equal(await lockToken(object), null, 'release gives the lock back')
  assert.deepEqual((await ops.listXattrs(object)).filter((n) => n.startsWith('blocksnap.heartbeat.')), [])
})

test('an owner of this host whose PID is gone is dead at once: no wait for its lease to lapse', async () => {
  await cluster.createImage('local', MiB)
  const origin = parseRbdAddress(cluster.address('local'))
  const object = leaseObjectOf(origin)
  const a = new Holder(cluster.address('local'), '/vol/local', 'local')
  await a.line('held ')
  a.kill('SIGKILL')
  await a.exit
  const notices: string[] = []
  const lease = await VolumeLease.acquire(origin, '/vol/local', () => [origin], { leaseSeconds: 60, onNotice: (m) => notices.push(m) })
  try {
    assert.ok(notices.some((n) => /is gone from this host/.test(n)), notices.join(' | '))
    assert.ok(!notices.some((n) => /watching its heartbeat/.test(n)), notices.join(' | '))
    assert.equal(await lockToken(object), lease.token)
  } finally {
    await lease.release()
  }
})

test('takeover of a stalled owner: its gateway is blocklisted first, its late writes fail, and on SIGCONT it finds the lease lost without touching the new heartbeat', async () => {
  await cluster.createImage('stall', 4 * MiB)
  const address = cluster.address('stall')
  const origin = parseRbdAddress(address)
  const object = leaseObjectOf(origin)
  const a = new Holder(address, '/vol/stall')
  const gateway = await startGateway('stall', cluster.dir)
  try {
    const oldToken = (await a.line('held ')).split(' ')[1] as string
    assert.equal((await nbdWrite(gateway.uri, 0, 65536, 0x11)).code, 0, 'the owner writes before it stalls')
    const watchers = await ops.imageWatchers('stall')
    assert.equal(watchers.length, 1)
    const oldGateway = watchers[0] as string
    assert.ok(!(await ops.blocklist()).has(oldGateway))
    a.kill('SIGSTOP')

    const notices: string[] = []
    const lease = await VolumeLease.acquire(origin, '/vol/stall', () => [origin], { leaseSeconds: LEASE_SECONDS, takeover: true, onNotice: (m) => notices.push(m) })
    try {
      assert.ok((await ops.blocklist()).has(oldGateway), 'the old gateway is fenced')
      assert.equal(await lockToken(object), lease.token)
      const fencedAt = notices.findIndex((n) => n.startsWith('fencing '))
      assert.ok(fencedAt >= 0 && notices[fencedAt]?.includes(oldGateway), notices.join(' | '))

      // The new owner writes through its own gateway; then the stalled one's late write fails.
      const fresh = await startGateway('stall', cluster.dir)
      try {
        assert.equal((await nbdWrite(fresh.uri, 65536, 65536, 0x22)).code, 0)
      } finally {
        fresh.stop()
      }
      const late = await nbdWrite(gateway.uri, 0, 65536, 0x99)
      assert.notEqual(late.code, 0, 'a fenced gateway must not accept writes')
      const image = await cluster.exportImage('stall')
      assert.ok(image.subarray(0, 65536).every((b) => b === 0x11), 'the late write did not land')
      assert.ok(image.subarray(65536, 131072).every((b) => b === 0x22))

      // The stalled owner wakes up: its next renewal finds the lease gone, and it stops, loudly.
      const newCounter = (await heartbeatCounter(object, lease.token)) as number
      a.kill('SIGCONT')
      const lost = await a.line('lost ')
      assert.match(lost, /lost its lease/)
      assert.match(lost, new RegExp(`pid ${process.pid}\\b`))
      assert.equal(await a.exit, 4)
      // The new owner is untouched: its lock, its heartbeat, still renewing.
      assert.equal(await lockToken(object), lease.token)
      await until('the new owner to renew', async () => ((await heartbeatCounter(object, lease.token)) ?? -1) > newCounter)
      const record = JSON.parse((await ops.getXattr(object, `blocksnap.heartbeat.${lease.token}`)) as string) as { pid: number; token: string }
      assert.equal(record.pid, process.pid)
      assert.equal(record.token, lease.token)
      assert.notEqual(oldToken, lease.token)
      await lease.assertHeld()
    } finally {
      await lease.release()
    }
  } finally {
    a.kill('SIGKILL')
    a.kill('SIGCONT')
    gateway.stop()
    await a.exit
  }
})

test('an owner whose lease was taken over sees it at the next check: assertHeld throws SNAP_BUSY and onLost fires once', async () => {
  await cluster.createImage('lost', MiB)
  const origin = parseRbdAddress(cluster.address('lost'))
  const lostCalls: string[] = []
  const first = await VolumeLease.acquire(origin, '/vol/lost', () => [origin], { leaseSeconds: LEASE_SECONDS, onLost: (e) => lostCalls.push(e.message) })
  await first.assertHeld()
  const second = await VolumeLease.acquire(origin, '/vol/lost', () => [origin], { leaseSeconds: LEASE_SECONDS, takeover: true })
  try {
    await assert.rejects(first.assertHeld(), (err: Error & { code?: string }) => err.code === 'SNAP_BUSY' && /lost its lease/.test(err.message))
    await assert.rejects(first.assertHeld(), (err: Error & { code?: string }) => err.code === 'SNAP_BUSY')
    assert.equal(lostCalls.length, 1)
    assert.equal(first.held, false)
    // The loser's release leaves the winner's lock alone.
    await first.release()
    await second.assertHeld()
    assert.equal(await lockToken(leaseObjectOf(origin)), second.token)
  } finally {
    await second.release()
  }
})

test('check of a volume whose lease a live owner on another host holds is refused, naming that owner', async () => {
  await cluster.createImage('checked', MiB)
  const address = cluster.address('checked')
  const vol = join(cluster.dir, 'checked-vol')
  await Volume.create(vol, { inPlaceOrigin: address })
  const holder = new Holder(address, vol)
  try {
    assert.match(await holder.first(), /^held /)
    // The COWs may be changing under that owner: a check there would read them half-written.
    await assert.rejects(checkVolumeFiles(vol, null), (err: unknown) => {
      assert.ok(isSnapError(err, 'SNAP_BUSY'), String(err))
      assert.match((err as Error).message, new RegExp(`pid ${holder.child.pid}\\b`))
      return true
    })
  } finally {
    holder.kill()
    await holder.exit
  }
})
