/**
 * Who on the same machine can reach a volume (docs/security.md): its directory and files are the
 * owner's alone whatever the umask, the control socket is 0600 from the moment it exists, and a
 * client never talks to a control socket another user planted. Other users are played by
 * `nobody` through setpriv (util-linux); the tests run as root, as CI does.
 */
import assert from 'node:assert/strict'
import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { chmod, mkdtemp, readdir, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { ControlClient } from '../../src/control/control-client.js'
import { ControlServer } from '../../src/control/control-server.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { isSnapError } from '../../src/errors.js'
import { staticExports } from '../../src/nbd/export.js'
import { NbdServer } from '../../src/nbd/server.js'
import { Volume } from '../../src/volume/volume.js'
import { assertError, cli } from '../cli/helpers.js'

const TIMEOUT = 60_000
const SIZE = 1024 * 1024
const AS_NOBODY = ['--reuid=nobody', '--regid=nogroup', '--clear-groups']

let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'bs-local-'))
  await chmod(T, 0o755) // nobody must reach the volumes for the tests to show what stops it
})

after(async () => {
  await rm(T, { recursive: true, force: true })
})

const modeOf = async (path: string) => (await stat(path)).mode & 0o777

/** Runs `fn` with umask 0, so only modes the code asks for explicitly can be private. */
async function underUmask0<R>(fn: () => Promise<R>): Promise<R> {
  const previous = process.umask(0)
  try {
    return await fn()
  } finally {
    process.umask(previous)
  }
}

/** Runs a command as nobody; resolves with its exit code and stderr. */
function asNobody(command: readonly string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile('setpriv', [...AS_NOBODY, ...command], { timeout: 30_000 }, (error, _stdout, stderr) => {
      resolve({ code: error ? (typeof error.code === 'number' ? error.code : -1) : 0, stderr: String(stderr) })
    })
  })
}

/** node -e as nobody: connects to a Unix socket and prints "connected" or the error code. */
function connectAsNobody(path: string): Promise<string> {
  const script = `require('net').connect(process.argv[1]).on('connect', function () { console.log('connected'); this.destroy() }).on('error', (e) => console.log(e.code))`
  return new Promise((resolve, reject) => {
    execFile('setpriv', [...AS_NOBODY, process.execPath, '-e', script, path], { timeout: 30_000 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${error.message}\n${stderr}`))
      else resolve(String(stdout).trim())
    })
  })
}

describe('local access', () => {
  it('a new volume is private whatever the umask: directories 0700, manifest, lock, origin and COW 0600', { timeout: TIMEOUT }, async () => {
    const vol = join(T, 'private')
    await underUmask0(async () => {
      await Volume.create(vol, { sizeBytes: SIZE })
      const v = await Volume.open(vol)
      try {
        await v.createSnapshot('s1', {}) // rewrites the manifest, creates a COW
        assert.equal(await modeOf(vol), 0o700, 'volume directory')
        assert.equal(await modeOf(join(vol, 'snapshots')), 0o700, 'snapshots/')
        assert.equal(await modeOf(join(vol, 'volume.json')), 0o600, 'volume.json, rewritten')
        assert.equal(await modeOf(join(vol, 'lock')), 0o600, 'lock')
        assert.equal(await modeOf((await v.info()).originPath), 0o600, 'origin')
        assert.equal(await modeOf(v.cowPath(v.record('s1'))), 0o600, 'COW')
        const origin = (await v.info()).originPath
        const cow = v.cowPath(v.record('s1'))
        // As another user: nothing in the directory, and even if its owner opens the directory
        // up, not the files (the directory listing is the only thing that becomes visible).
        assert.match((await asNobody(['ls', vol])).stderr, /Permission denied/)
        await chmod(vol, 0o755)
        await chmod(join(vol, 'snapshots'), 0o755)
        for (const file of [join(vol, 'volume.json'), origin, cow]) {
          const r = await asNobody(['cat', file])
          assert.notEqual(r.code, 0, file)
          assert.match(r.stderr, /Permission denied/, file)
        }
      } finally {
        await v.close()
      }
    })
  })

  it("a manifest's mode chosen by its owner survives rewrites", { timeout: TIMEOUT }, async () => {
    const vol = join(T, 'shared')
    await Volume.create(vol, { sizeBytes: SIZE })
    await chmod(join(vol, 'volume.json'), 0o640)
    const v = await Volume.open(vol)
    try {
      await v.createSnapshot('s1', {})
      await v.removeSnapshot('s1')
    } finally {
      await v.close()
    }
    assert.equal(await modeOf(join(vol, 'volume.json')), 0o640)
  })

  it('the control socket is 0600 whatever the umask, and another user cannot connect to it', { timeout: TIMEOUT }, async () => {
    const vol = join(T, 'ctl-mode')
    await Volume.create(vol, { sizeBytes: SIZE })
    await chmod(vol, 0o755) // so that only the socket's own mode stands in the way
    const volume = await Volume.open(vol)
    const server = new ControlServer(volume)
    try {
      await underUmask0(() => server.listen())
      const socket = join(vol, 'control.sock')
      const st = await stat(socket)
      assert.ok(st.isSocket())
      assert.equal(st.mode & 0o777, 0o600)
      assert.deepEqual((await readdir(vol)).filter((name) => name.startsWith('.')), [], 'no staging directory is left')
      assert.equal(await connectAsNobody(socket), 'EACCES')
      const client = await ControlClient.connect(vol)
      assert.ok(client, 'the owner connects')
      assert.equal((await client.list()).name, 'ctl-mode')
      client.close()
    } finally {
      await server.close()
      await volume.close()
    }
    assert.deepEqual(await readdir(vol).then((names) => names.filter((n) => n.includes('sock'))), [], 'the socket is removed on close')
  })

  it('an NBD --socket is created under the umask: under 022 other users cannot connect', { timeout: TIMEOUT }, async () => {
    const path = join(T, 'nbd.sock')
    const server = new NbdServer({ exports: staticExports([{ name: 'd', device: new MemoryDevice(4096), readOnly: false }]) })
    const previous = process.umask(0o022)
    try {
      await server.listen({ path })
    } finally {
      process.umask(previous)
    }
    try {
      assert.equal(await modeOf(path), 0o755)
      assert.equal(await connectAsNobody(path), 'EACCES')
    } finally {
      await server.close()
    }
  })

  it('a control socket planted by another user is refused by the client and gets no byte', { timeout: TIMEOUT }, async () => {
    const vol = join(T, 'planted')
    await Volume.create(vol, { sizeBytes: SIZE })
    // A directory another user may write (as a shared group directory would be).
    await chmod(vol, 0o777)
    const socket = join(vol, 'control.sock')
    const listener = plantListener(socket)
    try {
      await listener.ready
      assert.equal((await stat(socket)).uid, 65534, "the socket is nobody's")
      await assert.rejects(ControlClient.connect(vol), (err: unknown) => {
        assert.ok(isSnapError(err, 'SNAP_BUSY'), String(err))
        assert.equal(
          err.message,
          `${socket} belongs to uid 65534, not to the volume's owner (uid 0) or root; refusing to send it a command for ${vol}`,
        )
        return true
      })
      assertError(
        await cli(['write', vol, '--offset', '0'], { input: Buffer.from('SECRET') }),
        4,
        /^blocksnap: error \[SNAP_BUSY\]: \S+\/planted\/control\.sock belongs to uid 65534, not to the volume's owner \(uid 0\) or root; refusing to send it a command for \S+\n$/,
      )
    } finally {
      listener.child.kill('SIGTERM')
      await listener.exited
    }
    assert.equal(listener.output(), 'listening\n', 'the planted listener saw no connection and no data')
    const v = await Volume.open(vol)
    try {
      assert.deepEqual(await v.device(null).read(0, 6), new Uint8Array(6), 'nothing was written')
    } finally {
      await v.close()
    }
  })
})

/** A Unix socket listener run as nobody at `path`; it prints every connection and what it received. */
function plantListener(path: string): { child: ChildProcess; ready: Promise<void>; exited: Promise<void>; output: () => string } {
  const script = `
    const server = require('net').createServer((s) => {
      console.log('connection')
      s.on('data', (d) => {
        console.log('data ' + d.length)
        s.destroy() // a client that got this far must not wait for an answer
      })
    })
    server.listen(process.argv[1], () => console.log('listening'))
    process.on('SIGTERM', () => process.exit(0))`
  const child = spawn('setpriv', [...AS_NOBODY, process.execPath, '-e', script, path], { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  child.stderr?.on('data', (d: Buffer) => (err += d.toString('utf8')))
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()))
  const ready = new Promise<void>((resolve, reject) => {
    child.stdout?.on('data', (d: Buffer) => {
      out += d.toString('utf8')
      if (out.includes('listening')) resolve()
    })
    void exited.then(() => reject(new Error(`planted listener exited early: ${err}`)))
  })
  return { child, ready, exited, output: () => out }
}
