/**
 * Smaller service edges (issue 13, item 6): image files private to their owner, `--read-only`
 * honoured by the control socket too, the right one-line error for a denied control socket and
 * for a `--socket` in a missing directory, and bounded export names in the NBD log.
 */
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { chmod, copyFile, mkdtemp, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { ControlClient } from '../../src/control/control-client.js'
import { ControlServer } from '../../src/control/control-server.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { isSnapError } from '../../src/errors.js'
import { staticExports } from '../../src/nbd/export.js'
import { Volume } from '../../src/volume/volume.js'
import { infoRequestBytes } from '../support/nbd-bytes.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { startTestServer } from '../support/nbd-test-server.js'
import { ServeProcess } from '../support/serve-process.js'
import { BIN, REPO, assertError, cli } from './helpers.js'

const TIMEOUT = 60_000
const SIZE = 1024 * 1024

let T = ''
const servers = new Set<ServeProcess>()

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'bs-hard-'))
  await chmod(T, 0o755) // the unprivileged-user test must reach the volume's directory
})

after(async () => {
  for (const s of servers) if (s.alive() && s.pid !== undefined) process.kill(s.pid, 'SIGKILL')
  await rm(T, { recursive: true, force: true })
})

const modeOf = async (path: string) => (await stat(path)).mode & 0o777

describe('hardening', () => {
  it('origin and COW files are created 0600, also when copied from a world-readable file', { timeout: TIMEOUT }, async () => {
    const image = join(T, 'image.raw')
    await writeFile(image, Buffer.alloc(SIZE, 7))
    await chmod(image, 0o644)
    const sparse = join(T, 'modes-sparse')
    const copied = join(T, 'modes-copied')
    await Volume.create(sparse, { sizeBytes: SIZE })
    await Volume.create(copied, { fromImage: image })
    for (const dir of [sparse, copied]) {
      const v = await Volume.open(dir)
      try {
        assert.equal(await modeOf((await v.info()).originPath), 0o600, `${dir}: origin`)
        await v.createSnapshot('s1', {})
        const cow = v.cowPath(v.record('s1'))
        assert.equal(await modeOf(cow), 0o600, `${dir}: new COW`)
        const outside = join(T, `${v.name}-s1.cow`)
        await copyFile(cow, outside)
        await chmod(outside, 0o644)
        await v.importSnapshot('s2', outside)
        assert.equal(await modeOf(v.cowPath(v.record('s2'))), 0o600, `${dir}: imported COW`)
      } finally {
        await v.close()
      }
    }
  })

  it('a --read-only server refuses mutations through the control socket', { timeout: TIMEOUT }, async () => {
    const vol = join(T, 'ro-inproc')
    await Volume.create(vol, { sizeBytes: SIZE })
    const volume = await Volume.open(vol)
    await volume.createSnapshot('keep', {})
    let merged = false
    const server = new ControlServer(
      volume,
      {
        merge: async () => {
          merged = true
        },
      },
      { readOnly: true },
    )
    await server.listen()
    const client = await ControlClient.connect(vol)
    assert.ok(client)
    try {
      const refused = (op: string) => (err: unknown) => {
        assert.ok(isSnapError(err, 'SNAP_READ_ONLY'), String(err))
        assert.equal(err.message, `volume ro-inproc is served read-only: ${op} refused`)
        return true
      }
      await assert.rejects(client.write(null, 0, Buffer.from('NO')), refused('write'))
      await assert.rejects(client.write('keep', 0, Buffer.from('NO')), refused('write'))
      await assert.rejects(client.snapshot('new', {}), refused('snapshot'))
      await assert.rejects(client.remove('keep'), refused('remove'))
      await assert.rejects(client.importCow('imp', volume.cowPath(volume.record('keep')), false), refused('import'))
      await assert.rejects(client.call('merge', { name: 'keep' }), refused('merge'))
      assert.equal(merged, false)
      // Reading is what read-only serving is for.
      assert.deepEqual(await client.read(null, 0, 4), new Uint8Array(4))
      assert.deepEqual(volume.records.map((r) => r.name), ['keep'])
    } finally {
      client.close()
      await server.close()
      await volume.close()
    }
  })

  it('serve --read-only: CLI mutations fail with one line; a user denied the socket is told so', { timeout: TIMEOUT }, async () => {
    const vol = join(T, 'ro')
    await Volume.create(vol, { sizeBytes: SIZE })
    const s = await ServeProcess.start([vol, '--listen', '127.0.0.1:0', '--read-only'])
    servers.add(s)
    // The socket is root's (mode 0755 under umask 022): nobody may not connect to it.
    const denied = await asNobody(['list', vol])
    assert.equal(denied.code, 4, denied.stderr)
    assert.match(denied.stderr, /^blocksnap: error \[SNAP_BUSY\]: permission denied on \S+\/ro\/control\.sock[^\n]*\n$/)
    assert.doesNotMatch(denied.stderr, /in use by process/)

    assertError(await cli(['write', vol, '--offset', '0'], { input: Buffer.from('NO') }), 1, /^blocksnap: error \[SNAP_READ_ONLY\]: volume ro is served read-only: write refused\n$/)
    assertError(await cli(['snapshot', `${vol}@x`]), 1, /^blocksnap: error \[SNAP_READ_ONLY\]: volume ro is served read-only: snapshot refused\n$/)

    process.kill(s.pid as number, 'SIGTERM')
    assert.deepEqual(await s.exit, { code: 0, signal: null }, s.log)
    servers.delete(s)
    const v = await Volume.open(vol)
    try {
      assert.deepEqual(v.records, [])
      assert.deepEqual(await v.device(null).read(0, 2), new Uint8Array(2))
    } finally {
      await v.close()
    }
  })

  it('--socket in a missing directory says the directory does not exist', { timeout: TIMEOUT }, async () => {
    const vol = join(T, 'nodir')
    await Volume.create(vol, { sizeBytes: SIZE })
    const missing = join(T, 'missing')
    assertError(
      await cli(['serve', vol, '--listen', '127.0.0.1:0', '--socket', join(missing, 'nbd.sock')]),
      1,
      new RegExp(`^blocksnap: error \\[SNAP_[A-Z_]+\\]: cannot use socket \\S+/nbd\\.sock: directory ${missing} does not exist\\n$`),
    )
  })

  it('client-chosen export names are truncated in the log', { timeout: TIMEOUT }, async () => {
    const srv = await startTestServer({ exports: staticExports([{ name: 'disk', device: new MemoryDevice(SIZE), readOnly: false }]) })
    try {
      // GO names are at most 4096 bytes (the spec's string limit); EXPORT_NAME takes 64 KiB.
      const long = 'n'.repeat(60_000)
      const shown = `${'n'.repeat(64)}…`
      const c1 = await RawNbdClient.connect({ port: srv.port })
      await c1.handshake()
      c1.option(7, infoRequestBytes(long.slice(0, 4096), [])) // GO: answered with ERR_UNKNOWN
      const [reply] = await c1.optionReplies()
      assert.equal(reply?.type, 0x80000006)
      assert.match(reply?.data.toString('utf8') ?? '', new RegExp(`'${shown}'`))
      c1.option(1, Buffer.from(long)) // EXPORT_NAME: the connection is closed
      await c1.closed
      const mentions = srv.logs.filter((line) => line.includes('nnnn'))
      assert.ok(mentions.length >= 2, srv.logs.join('\n'))
      for (const line of mentions) {
        assert.ok(line.includes(`'${shown}'`), line.slice(0, 300))
        assert.ok(line.length < 400, `log line of ${line.length} chars`)
      }
    } finally {
      await srv.close()
    }
  })
})

/** Runs the CLI as user nobody (setpriv, util-linux). */
function asNobody(args: readonly string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      'setpriv',
      ['--reuid=nobody', '--regid=nogroup', '--clear-groups', process.execPath, BIN, ...args],
      { cwd: REPO, env: { ...process.env, BLOCKSNAP_LOG_LEVEL: 'warn' }, timeout: 60_000 },
      (error, _stdout, stderr) => {
        resolve({ code: error ? (typeof error.code === 'number' ? error.code : -1) : 0, stderr: String(stderr) })
      },
    )
  })
}
