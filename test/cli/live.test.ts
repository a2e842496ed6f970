/**
 * CLI end-to-end, served: `blocksnap serve VOL` runs as a child process; other blocksnap
 * commands on VOL are carried out by it through the control socket, and qemu-io/nbdinfo talk to
 * its NBD exports. A byte model of the origin and of each snapshot is checked after every step.
 * The tests run in order and build on each other.
 */
import assert from 'node:assert/strict'
import { access, mkdtemp, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { requireTools, run } from '../support/nbd-tools.js'
import { assertBytes, assertError, cli, cliOk, parseList, pattern, volumeLockFree } from './helpers.js'
import { freePort } from '../support/free-port.js'
import { ServeProcess } from '../support/serve-process.js'

const MiB = 1024 * 1024
const SIZE = 4 * MiB
const SECTORS = SIZE / 512
const NAME = 'lv'

let T = ''
let vol = ''
let port = 0
let server: ServeProcess | null = null

/** Byte models: the origin, and each snapshot as of its creation. */
const origin = Buffer.alloc(SIZE)
const snaps = new Map<string, Buffer>()

const uri = (exportName: string) => `nbd://127.0.0.1:${port}/${exportName}`
const exists = (p: string) => access(p).then(
  () => true,
  () => false,
)
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function qemuIo(exportName: string, command: string, readOnly = false): Promise<void> {
  const r = await run('qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), '-c', command, uri(exportName)])
  assert.equal(r.code, 0, `qemu-io -c '${command}' ${uri(exportName)}: exit ${r.code}\n${r.stdout}${r.stderr}`)
  assert.doesNotMatch(r.stdout + r.stderr, /verification failed|error/i, `qemu-io -c '${command}' ${uri(exportName)}`)
}

async function exportNames(): Promise<string[]> {
  const r = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${port}`])
  assert.equal(r.code, 0, `nbdinfo --list: ${r.stderr}`)
  const parsed = JSON.parse(r.stdout) as { exports: { 'export-name': string }[] }
  return parsed.exports.map((e) => e['export-name']).sort()
}

function serverAlive(): boolean {
  return server !== null && server.alive()
}

before(async () => {
  await requireTools('qemu-io', 'nbdinfo')
  T = await mkdtemp(join(tmpdir(), 'blocksnap-live-'))
  vol = join(T, NAME)
  await cliOk(['create', vol, '--size', '4M'])
  // Zeros in the first 2 MiB, a pattern in the third, zeros in the fourth.
  const initial = pattern(MiB, 21)
  await cliOk(['write', vol, '--offset', String(2 * MiB)], { input: initial })
  initial.copy(origin, 2 * MiB)

  port = await freePort()
  server = await ServeProcess.start([vol, '--listen', `127.0.0.1:${port}`])
  assert.ok(await exists(join(vol, 'control.sock')), 'the control socket exists while serving')
})

after(async () => {
  if (server && serverAlive() && server.pid !== undefined) {
    process.kill(server.pid, 'SIGKILL')
    await server.exit
  }
  if (T) await rm(T, { recursive: true, force: true })
})

describe('cli (served)', () => {
  it('cli: live snapshot, list, status, read and write are carried out by the server', async () => {
    assert.equal((await readFile(join(vol, 'lock'), 'utf8')).trim(), String(server?.pid), 'the server owns the volume')
    await cliOk(['snapshot', `${vol}@s`])
    snaps.set('s', Buffer.from(origin))

    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.equal(info.path, vol)
    assert.equal(info.sizeBytes, SIZE)
    assert.deepEqual(
      info.snapshots.map((s) => [s.name, s.store, s.chunkSizeBytes, s.state]),
      [['s', 'persistent', 4096, 'active']],
    )
    const t = info.snapshots[0]!.cowSizeBytes / 512
    assert.equal(info.snapshots[0]!.cowSizeBytes, (await stat(join(vol, 'snapshots', 's.cow'))).size)
    assert.equal((await cliOk(['status', `${vol}@s`])).toString(), `0 ${SECTORS} snapshot 16/${t} 16\n`)

    // An odd-offset write through the server, straddling chunks.
    const data = pattern(5000, 22)
    await cliOk(['write', vol, '--offset', String(MiB + 4093)], { input: data })
    data.copy(origin, MiB + 4093)
    assertBytes(await cliOk(['read', vol, '--offset', String(MiB), '--length', '16384']), origin.subarray(MiB, MiB + 16384), 'origin read live')
    assertBytes(await cliOk(['read', `${vol}@s`]), snaps.get('s')!, 'snapshot read live keeps the old data')
    assert.equal((await cliOk(['status', vol])).toString(), `0 ${SECTORS} snapshot-origin\n`)
    assert.ok(serverAlive())
  })

  it('cli: transient and PO snapshots live (a transient snapshot only while served)', async () => {
    await cliOk(['snapshot', `${vol}@t`, '--store', 'transient'])
    snaps.set('t', Buffer.from(origin))
    await cliOk(['snapshot', `${vol}@po`, '--overflow', '--cow-size', '16K'])
    // The PO snapshot's COW holds two data chunks: a five-chunk write to it overflows.
    assertError(await cli(['write', `${vol}@po`, '--offset', '0'], { input: pattern(20_000, 23) }), 1, /overflow/i)
    const info = parseList(await cliOk(['list', vol, '--json']))
    const t = info.snapshots.find((s) => s.name === 't')
    const po = info.snapshots.find((s) => s.name === 'po')
    assert.ok(t && po, JSON.stringify(info))
    assert.equal(t.store, 'transient')
    assert.equal(t.metadataBytes, 0)
    assert.equal(t.state, 'active')
    assert.equal(po.overflow, true)
    assert.equal(po.state, 'overflow')
    assert.equal((await cliOk(['status', `${vol}@t`])).toString(), `0 ${SECTORS} snapshot 0/${t.cowSizeBytes / 512} 0\n`)
    assert.equal((await cliOk(['status', `${vol}@po`])).toString(), `0 ${SECTORS} snapshot Overflow\n`)
    await cliOk(['remove', `${vol}@po`])
    assert.equal(await exists(join(vol, 'snapshots', 'po.cow')), false, 'the removed COW is deleted')
  })

  it('cli: NBD writes with qemu-io; the snapshot exports still read the old pattern', async () => {
    await qemuIo(NAME, 'write -P 0x5a 0 1M')
    origin.fill(0x5a, 0, MiB)
    await qemuIo(NAME, 'read -P 0x5a 0 1M', true)
    await qemuIo(`${NAME}@s`, 'read -P 0x00 0 1M', true)
    await qemuIo(`${NAME}@t`, 'read -P 0x00 0 1M', true)
    assertBytes(await cliOk(['read', `${vol}@t`]), snaps.get('t')!, 'transient snapshot after NBD writes')
  })

  it('cli: nbdinfo --list shows exports appearing and disappearing', async () => {
    assert.deepEqual(await exportNames(), [NAME, `${NAME}@s`, `${NAME}@t`])
    await cliOk(['snapshot', `${vol}@extra`, '--chunk-size', '64K'])
    assert.deepEqual(await exportNames(), [NAME, `${NAME}@extra`, `${NAME}@s`, `${NAME}@t`])
    await cliOk(['remove', `${vol}@extra`])
    assert.deepEqual(await exportNames(), [NAME, `${NAME}@s`, `${NAME}@t`])
  })

  it('cli: live merge --wait while qemu-io writes elsewhere', async () => {
    await cliOk(['snapshot', `${vol}@mg`])
    snaps.set('mg', Buffer.from(origin))
    // Give mg 2 MiB of exceptions (512 chunks) to merge back; s and t get exceptions too.
    await qemuIo(NAME, 'write -P 0x33 0 2M')
    origin.fill(0x33, 0, 2 * MiB)

    // Slow enough (~8 s) that the writer runs during the merge.
    const merging = cli(['merge', `${vol}@mg`, '--wait', '--rate', String(256 * 1024)], { timeoutMs: 120_000 })
    let status = ''
    for (let i = 0; i < 20 && !status.includes('snapshot-merge'); i++) {
      status = (await cliOk(['status', vol])).toString()
      if (!status.includes('snapshot-merge')) await sleep(200)
    }
    assert.match(status, new RegExp(`^0 ${SECTORS} snapshot-merge \\d+/\\d+ \\d+\\n$`), 'the origin is a snapshot-merge target while merging')
    const names = await exportNames()
    assert.ok(!names.includes(`${NAME}@mg`), `a merging snapshot is not exported: ${names.join(', ')}`)
    const writes = Array.from({ length: 16 }, (_, i) => ['-c', `write -P 0x${(0x70 + i).toString(16)} ${3 * MiB + i * 65536} 64k`]).flat()
    const writer = await run('qemu-io', ['-f', 'raw', ...writes, uri(NAME)])
    assert.equal(writer.code, 0, `qemu-io writer: ${writer.stderr}`)
    const merged = await merging
    ok(merged)

    const expected = Buffer.from(snaps.get('mg')!)
    for (let i = 0; i < 16; i++) expected.fill(0x70 + i, 3 * MiB + i * 65536, 3 * MiB + (i + 1) * 65536)
    expected.copy(origin)
    snaps.delete('mg')
    assertBytes(await cliOk(['read', vol]), origin, 'origin after the live merge')
    assertBytes(await cliOk(['read', `${vol}@s`]), snaps.get('s')!, 'another snapshot is untouched by the merge')
    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.equal(info.merge, null)
    assert.deepEqual(info.snapshots.map((s) => s.name).sort(), ['s', 't'])
    assert.equal(await exists(join(vol, 'snapshots', 'mg.cow')), false)
    assert.deepEqual(await exportNames(), [NAME, `${NAME}@s`, `${NAME}@t`])
  })

  it('cli: SIGTERM stops the server cleanly; reopening offline shows the data', async () => {
    assert.ok(server?.pid !== undefined && serverAlive(), 'the server is still running')
    process.kill(server.pid, 'SIGTERM')
    const exit = await server.exit
    assert.deepEqual(exit, { code: 0, signal: null }, `server exit; log:\n${server.log}`)
    assert.ok(volumeLockFree(vol), 'the volume lock is released')
    assert.equal(await exists(join(vol, 'control.sock')), false, 'the control socket is removed')

    // Offline now: the transient snapshot is gone with its server.
    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.deepEqual(
      info.snapshots.map((s) => [s.name, s.store, s.state]),
      [['s', 'persistent', 'active']],
    )
    assert.equal(await exists(join(vol, 'snapshots', 't.cow')), false, "the transient snapshot's COW is deleted")
    assertError(await cli(['snapshot', `${vol}@t2`, '--store', 'transient']), 1, /transient/)
    assertBytes(await readFile(join(vol, 'origin.img')), origin, 'origin.img after the server stopped')
    assertBytes(await cliOk(['read', `${vol}@s`]), snaps.get('s')!, 'snapshot s reopened offline')
  })
})

function ok(r: { code: number; stderr: string }): void {
  assert.equal(r.code, 0, `exit ${r.code}: ${r.stderr}\nserver log:\n${server?.log.slice(-4000)}`)
}
