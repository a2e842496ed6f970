/**
 * Control sockets reach the volume they name and no other (issue 13, item 1).
 *
 * A Unix socket path holds 107 bytes; `VOL/control.sock` beyond that used to be bound, and
 * connected to, at a silently truncated path, so two volumes whose paths share a long prefix
 * shared one socket and commands for one landed on the other. The server now binds through
 * the directory (/proc/self/fd/N/control.sock) and every connection starts with a HELLO naming
 * the volume (device and inode of its directory), which both sides check.
 */
import assert from 'node:assert/strict'
import { mkdtemp, readdir, rm, symlink } from 'node:fs/promises'
import { createConnection } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { ControlClient } from '../../src/control/control-client.js'
import { ControlServer } from '../../src/control/control-server.js'
import { isSnapError } from '../../src/errors.js'
import { Volume } from '../../src/volume/volume.js'
import { ServeProcess } from '../support/serve-process.js'
import { assertError, cli, ok } from './helpers.js'

const TIMEOUT = 90_000
const SIZE = 1024 * 1024

let T = ''
const servers = new Set<ServeProcess>()

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'bs-ctl-'))
})

after(async () => {
  for (const s of servers) if (s.alive() && s.pid !== undefined) process.kill(s.pid, 'SIGKILL')
  await rm(T, { recursive: true, force: true })
})

async function serve(vol: string): Promise<ServeProcess> {
  const s = await ServeProcess.start([vol, '--listen', '127.0.0.1:0'])
  servers.add(s)
  return s
}

async function stop(s: ServeProcess): Promise<void> {
  process.kill(s.pid as number, 'SIGTERM')
  assert.deepEqual(await s.exit, { code: 0, signal: null }, `server exit:\n${s.log}`)
  servers.delete(s)
}

/** The first bytes of the origin and the snapshot names, read offline. */
async function offline(vol: string, bytes: number): Promise<{ head: string; snapshots: string[] }> {
  const v = await Volume.open(vol)
  try {
    return { head: Buffer.from(await v.device(null).read(0, bytes)).toString('latin1'), snapshots: v.records.map((r) => r.name) }
  } finally {
    await v.close()
  }
}

describe('control socket', () => {
  it('volumes whose paths share a prefix longer than a socket path each get their own commands', { timeout: TIMEOUT }, async () => {
    // As in the issue: …/v<98 x>1 and …/v<98 x>2; VOL/control.sock is well over 107 bytes.
    const vol1 = join(T, `v${'x'.repeat(98)}1`)
    const vol2 = join(T, `v${'x'.repeat(98)}2`)
    assert.ok(Buffer.byteLength(join(vol1, 'control.sock')) > 120)
    await Volume.create(vol1, { sizeBytes: SIZE })
    await Volume.create(vol2, { sizeBytes: SIZE })

    const s1 = await serve(vol1)
    ok(await cli(['write', vol1, '--offset', '0'], { input: Buffer.from('LIVE1') }), 'live write to volume 1')
    ok(await cli(['write', vol2, '--offset', '0'], { input: Buffer.from('WRONG') }), 'write to volume 2')
    ok(await cli(['snapshot', `${vol2}@oops`]), 'snapshot of volume 2')
    await stop(s1)

    assert.deepEqual(await offline(vol1, 5), { head: 'LIVE1', snapshots: [] }, 'volume 1 got only its own write')
    assert.deepEqual(await offline(vol2, 5), { head: 'WRONG', snapshots: ['oops'] }, 'volume 2 got its write and snapshot')
    assert.deepEqual((await readdir(T)).sort(), [`v${'x'.repeat(98)}1`, `v${'x'.repeat(98)}2`], 'no stray socket beside the volumes')
    assert.ok(!(await readdir(vol1)).includes('control.sock'), 'the control socket is removed')

    // Served again, killed (leaving its socket), served again: no EADDRINUSE on a stale path.
    const s2 = await serve(vol1)
    process.kill(s2.pid as number, 'SIGKILL')
    await s2.exit
    servers.delete(s2)
    assert.ok((await readdir(vol1)).includes('control.sock'), 'SIGKILL leaves the socket behind')
    const s3 = await serve(vol1)
    await stop(s3)
    assert.ok(!(await readdir(vol1)).includes('control.sock'))
  })

  it('a socket that leads to another volume is refused before any command is carried out', { timeout: TIMEOUT }, async () => {
    const a = join(T, 'a')
    const b = join(T, 'b')
    await Volume.create(a, { sizeBytes: SIZE })
    await Volume.create(b, { sizeBytes: SIZE })
    const volume = await Volume.open(a)
    const server = new ControlServer(volume)
    await server.listen()
    try {
      // b's socket path leads to a's server, as a mistaken path would.
      await symlink(join(a, 'control.sock'), join(b, 'control.sock'))
      await assert.rejects(ControlClient.connect(b), (err: unknown) => {
        assert.ok(isSnapError(err, 'SNAP_BUSY'), String(err))
        assert.match(err.message, /control socket of another volume \(it serves .*\/a\)/)
        return true
      })
      const r = await cli(['write', b, '--offset', '0'], { input: Buffer.from('WRONG') })
      assertError(r, 4, /control socket of another volume/)

      // A connection that skips HELLO, or names another volume, gets nothing done.
      const replies = await rawExchange(join(a, 'control.sock'), [
        { id: 1, op: 'write', args: { snapshot: null, offset: 0, data: Buffer.from('RAW').toString('base64') } },
        { id: 2, op: 'hello', args: { dev: '1', ino: '2' } },
        { id: 3, op: 'write', args: { snapshot: null, offset: 0, data: Buffer.from('RAW').toString('base64') } },
      ])
      assert.equal(replies.length, 3)
      for (const id of [1, 3]) {
        const reply = replies.find((x) => x.id === id)
        assert.equal(reply?.ok, false, JSON.stringify(replies))
        assert.match(reply?.error?.message ?? '', /has not named this volume/)
      }
      assert.equal(Buffer.from(await volume.device(null).read(0, 5)).toString('latin1'), '\0'.repeat(5), 'volume a is untouched')

      // The right volume still works.
      const client = await ControlClient.connect(a)
      assert.ok(client)
      await client.write(null, 0, Buffer.from('RIGHT'))
      client.close()
      assert.equal(Buffer.from(await volume.device(null).read(0, 5)).toString('latin1'), 'RIGHT')
    } finally {
      await server.close()
      await volume.close()
    }
    assert.deepEqual(await offline(b, 5), { head: '\0'.repeat(5), snapshots: [] }, 'volume b is untouched')
  })
})

interface RawReply {
  id: number
  ok: boolean
  error?: { message: string }
}

/** Sends JSON lines and collects one reply per request. */
function rawExchange(path: string, requests: readonly object[]): Promise<RawReply[]> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(path)
    const replies: RawReply[] = []
    let pending = ''
    socket.on('error', reject)
    socket.on('data', (d: Buffer) => {
      pending += d.toString('utf8')
      const lines = pending.split('\n')
      pending = lines.pop() ?? ''
      for (const line of lines) if (line.trim()) replies.push(JSON.parse(line) as RawReply)
      if (replies.length === requests.length) {
        socket.destroy()
        resolve(replies)
      }
    })
    socket.on('connect', () => socket.write(requests.map((r) => `${JSON.stringify(r)}\n`).join('')))
  })
}
