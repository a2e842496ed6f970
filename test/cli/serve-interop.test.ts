/**
 * Interop against the real product: `blocksnap serve VOL` (a child process) exporting a
 * 64 MiB volume with 4K- and 64K-chunk snapshots, driven by nbdinfo, qemu-img, qemu-io, nbdcopy,
 * fio and nbdsh over TCP and over the Unix socket, then served again with --read-only, with a PSK
 * (--tls-psk, --tls require) and with an X.509 certificate (--tls-cert/--tls-key). Byte models of
 * the origin and of each snapshot are checked after every step; the exceptions map must name
 * exactly the chunks the origin wrote since the snapshot. The tests run in order and build on
 * each other; every server is stopped with SIGTERM and must exit 0.
 */
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { access, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { NBDSH_TRY, fioVerify, makeSelfSignedPki, nbdsh, requireTools, run, runOk } from '../support/nbd-tools.js'
import { assertBytes, assertError, cli, cliOk, volumeLockFree } from './helpers.js'
import { freePort } from '../support/free-port.js'
import { ServeProcess } from '../support/serve-process.js'

const MiB = 1024 * 1024
const SIZE = 64 * MiB
const NAME = 'vol'
const TIMEOUT = 60_000

let T = ''
let vol = ''

/** Byte models: the origin now, and each snapshot as of its creation (plus its own writes). */
const origin = Buffer.alloc(SIZE)
const snaps = new Map<string, Buffer>()
/** Origin writes since the snapshots were taken: [offset, length]. */
const originWrites: [number, number][] = []

/** A running server and where it listens. */
type Served = ServeProcess & { readonly port: number; readonly sock: string }

const running = new Set<Served>()
let srv: Served

const exists = (p: string) => access(p).then(
  () => true,
  () => false,
)

/** Starts `blocksnap serve` on a free port and a fresh socket. */
async function startServe(tag: string, extra: readonly string[] = []): Promise<Served> {
  const port = await freePort()
  const sock = join(T, `${tag}.sock`)
  const served = Object.assign(await ServeProcess.start([vol, '--listen', `127.0.0.1:${port}`, '--socket', sock, ...extra], 20_000), { port, sock })
  running.add(served)
  return served
}

/** SIGTERM, exit 0, the volume lock released and the socket gone. */
async function stopServe(s: Served): Promise<void> {
  assert.ok(s.child.pid !== undefined && s.child.exitCode === null, `server is running:\n${s.log}`)
  process.kill(s.child.pid, 'SIGTERM')
  const exit = await s.exit
  running.delete(s)
  assert.deepEqual(exit, { code: 0, signal: null }, `server exit; log:\n${s.log.slice(-4000)}`)
  assert.match(s.log, /SIGTERM: stopping/)
  assert.doesNotMatch(s.log, /"level":(50|60)/, `errors logged:\n${s.log.slice(-4000)}`)
  assert.ok(volumeLockFree(vol), 'the volume lock is released')
  assert.equal(await exists(s.sock), false, 'the NBD socket is removed')
}

interface Transport {
  readonly name: string
  /** URI of one export. */
  uri(exportName: string): string
  /** URI of the server, for --list. */
  readonly root: string
}

function transports(s: Served): Transport[] {
  return [
    { name: 'tcp', uri: (e) => `nbd://127.0.0.1:${s.port}/${e}`, root: `nbd://127.0.0.1:${s.port}` },
    { name: 'unix', uri: (e) => `nbd+unix:///${e}?socket=${s.sock}`, root: `nbd+unix://?socket=${s.sock}` },
  ]
}

async function qemuIo(uri: string, commands: readonly string[], readOnly = false): Promise<void> {
  const r = await run('qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...commands.flatMap((c) => ['-c', c]), uri])
  assert.equal(r.code, 0, `qemu-io ${commands.join('; ')} ${uri}: exit ${r.code}\n${r.stdout}${r.stderr}`)
  assert.doesNotMatch(r.stdout + r.stderr, /verification failed|error/i, `qemu-io ${commands.join('; ')} ${uri}`)
}

/** Writes a model to a raw file (for qemu-img compare / nbdcopy). */
async function modelFile(name: string, content: Buffer): Promise<string> {
  const p = join(T, `${name}.raw`)
  await writeFile(p, content)
  return p
}

/** qemu-img compare of an export against a local file: "Images are identical". */
async function assertIdentical(uri: string, file: string, what: string): Promise<void> {
  const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, uri])
  assert.equal(r.code, 0, `${what}: qemu-img compare ${uri} ${file}: exit ${r.code}\n${r.stdout}${r.stderr}`)
  assert.match(r.stdout, /Images are identical/)
}

/** qemu-img convert of an export to a raw file, compared byte for byte with the model. */
async function assertConverted(uri: string, expected: Buffer, what: string): Promise<void> {
  const out = join(T, 'convert-out.raw')
  await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out])
  assertBytes(await readFile(out), expected, what)
  await rm(out)
}

type Extent = [offset: number, length: number, flags: number]

/** Parses `nbdinfo --map` output and coalesces adjacent extents with equal flags. */
function parseMap(stdout: string): Extent[] {
  const out: Extent[] = []
  for (const line of stdout.trim().split('\n')) {
    const [offset, length, flags] = line.trim().split(/\s+/).slice(0, 3).map(Number) as [number, number, number]
    const last = out[out.length - 1]
    if (last) assert.equal(last[0] + last[1], offset, `extents are consecutive:\n${stdout}`)
    if (last && last[2] === flags) last[1] += length
    else out.push([offset, length, flags])
  }
  return out
}

/** The exceptions map a snapshot with `chunk`-byte chunks must report after `originWrites`. */
function expectedExceptions(chunk: number): Extent[] {
  const inCow = new Set<number>()
  for (const [offset, length] of originWrites) {
    for (let c = Math.floor(offset / chunk); c <= Math.floor((offset + length - 1) / chunk); c++) inCow.add(c)
  }
  const out: Extent[] = []
  for (let c = 0; c < SIZE / chunk; c++) {
    const flags = inCow.has(c) ? 1 : 0
    const last = out[out.length - 1]
    if (last && last[2] === flags) last[1] += chunk
    else out.push([c * chunk, chunk, flags])
  }
  return out
}

before(async () => {
  await requireTools('nbdinfo', 'nbdcopy', 'nbdsh', 'qemu-img', 'qemu-io', 'fio', 'openssl')
  T = await mkdtemp(join(tmpdir(), 'blocksnap-serve-interop-'))
  vol = join(T, NAME)
  await cliOk(['create', vol, '--size', '64M'])
  srv = await startServe('plain')
}, { timeout: TIMEOUT })

after(async () => {
  for (const s of running) {
    if (s.child.pid !== undefined && s.child.exitCode === null && s.child.signalCode === null) {
      process.kill(s.child.pid, 'SIGKILL')
      await s.exit
    }
  }
  if (T) await rm(T, { recursive: true, force: true })
}, { timeout: TIMEOUT })

describe('serve interop', () => {
  it('fill the origin with nbdcopy, then take 4K and 64K snapshots live', { timeout: TIMEOUT }, async () => {
    randomBytes(6 * MiB).copy(origin, 0)
    randomBytes(MiB + 5000).copy(origin, 30 * MiB)
    randomBytes(2 * MiB).copy(origin, 62 * MiB)
    const file = await modelFile('origin', origin)
    const [tcp, unix] = transports(srv) as [Transport, Transport]
    await runOk('nbdcopy', ['--connections=4', '--flush', file, tcp.uri(NAME)])
    await assertIdentical(unix.uri(NAME), file, 'origin after nbdcopy')

    await cliOk(['snapshot', `${vol}@s4`, '--chunk-size', '4K'])
    await cliOk(['snapshot', `${vol}@s64`, '--chunk-size', '64K'])
    await cliOk(['snapshot', `${vol}@w`])
    for (const s of ['s4', 's64', 'w']) snaps.set(s, Buffer.from(origin))
    await modelFile('s4', origin)
    await modelFile('s64', origin)
  })

  it('nbdinfo --list --json and --json: exports, sizes, block sizes, meta contexts (TCP and Unix)', { timeout: TIMEOUT }, async () => {
    for (const t of transports(srv)) {
      const list = JSON.parse((await runOk('nbdinfo', ['--list', '--json', t.root])).stdout)
      assert.equal(list.protocol, 'newstyle-fixed', t.name)
      assert.equal(list.TLS, false)
      const exports = list.exports as Record<string, unknown>[]
      assert.deepEqual(exports.map((e) => e['export-name']), [NAME, `${NAME}@s4`, `${NAME}@s64`, `${NAME}@w`], t.name)
      for (const e of exports) {
        const what = `${t.name} ${String(e['export-name'])}`
        assert.equal(e['export-size'], SIZE, what)
        assert.equal(e.block_size_minimum, 1, what)
        assert.equal(e.block_size_preferred, 4096, what)
        assert.equal(e.block_size_maximum, 32 * MiB, what)
        assert.equal(e.is_read_only, false, what)
        assert.equal(e.can_flush, true, what)
        assert.equal(e.can_multi_conn, true, what)
        const snapshot = String(e['export-name']).includes('@')
        const originContexts = ['base:allocation', ...['s4', 's64', 'w'].map((s) => `qemu:dirty-bitmap:${s}`)]
        assert.deepEqual(e.contexts, snapshot ? ['base:allocation', 'blocksnap:exceptions'] : originContexts, what)
      }
      assert.match(String(exports[1]!.description), /chunk 4096 bytes/)
      assert.match(String(exports[2]!.description), /chunk 65536 bytes/)

      const one = JSON.parse((await runOk('nbdinfo', ['--json', t.uri(`${NAME}@s64`)])).stdout)
      assert.equal(one.exports.length, 1)
      assert.equal(one.exports[0]['export-name'], `${NAME}@s64`)
      assert.deepEqual(one.exports[0].contexts, ['base:allocation', 'blocksnap:exceptions'])
      assert.equal(one.exports[0]['export-size'], SIZE)
      const size = await runOk('nbdinfo', ['--size', t.uri(`${NAME}@s4`)])
      assert.equal(size.stdout.trim(), String(SIZE))
    }
    const missing = await run('nbdinfo', [transports(srv)[0]!.uri(`${NAME}@nope`)])
    assert.notEqual(missing.code, 0, 'an unknown snapshot is not exported')
  })

  it('qemu-io writes to the origin with patterns; the snapshot exports keep the old data', { timeout: TIMEOUT }, async () => {
    const [tcp, unix] = transports(srv) as [Transport, Transport]
    const write = async (t: Transport, command: string, offset: number, length: number, fill: number) => {
      await qemuIo(t.uri(NAME), [`${command} ${offset} ${length}`])
      origin.fill(fill, offset, offset + length)
      originWrites.push([offset, length])
    }
    // Straddling 4K chunks inside one 64K chunk; two whole 64K chunks; write-zeroes over zeros;
    // an FUA write straddling 64K chunks near the end.
    await write(tcp, 'write -P 0xa1', 3 * 4096 + 100, 5000, 0xa1)
    await write(tcp, 'write -P 0xb2', 10 * MiB, 128 * 1024, 0xb2)
    await write(unix, 'write -z', 40 * MiB, 4096, 0)
    await write(unix, 'write -f -P 0xc3', 63 * MiB + 12345, 70000, 0xc3)
    await write(unix, 'write -P 0xd4', 30 * MiB + 65536 - 7, 14, 0xd4)

    await qemuIo(tcp.uri(NAME), ['read -P 0xa1 12388 5000', 'read -P 0xb2 10M 128k', 'read -P 0 40M 4k'], true)
    await qemuIo(unix.uri(`${NAME}@s4`), ['read -P 0 40M 4k', 'read -P 0 12M 1M'], true)
    await assertIdentical(unix.uri(NAME), await modelFile('origin', origin), 'origin after qemu-io writes')
    for (const t of [tcp, unix]) {
      await assertConverted(t.uri(`${NAME}@s4`), snaps.get('s4')!, `${t.name}: qemu-img convert of s4`)
      await assertConverted(t.uri(`${NAME}@s64`), snaps.get('s64')!, `${t.name}: qemu-img convert of s64`)
    }
    await assertIdentical(tcp.uri(`${NAME}@w`), join(T, 's4.raw'), 'w keeps the old data too')
  })

  it('nbdinfo --map=blocksnap:exceptions names exactly the chunks the origin wrote; --map works', { timeout: TIMEOUT }, async () => {
    for (const t of transports(srv)) {
      for (const [snap, chunk] of [['s4', 4096], ['s64', 65536]] as const) {
        const map = await runOk('nbdinfo', ['--map=blocksnap:exceptions', t.uri(`${NAME}@${snap}`)])
        assert.deepEqual(parseMap(map.stdout), expectedExceptions(chunk), `${t.name}: exceptions of ${snap}`)
      }
      for (const e of [NAME, `${NAME}@s4`]) {
        const base = await runOk('nbdinfo', ['--map', t.uri(e)])
        const extents = parseMap(base.stdout)
        assert.equal(extents[0]![0], 0)
        assert.equal(extents.reduce((n, x) => n + x[1], 0), SIZE, `${t.name}: base:allocation covers ${e}`)
      }
      const noContext = await run('nbdinfo', ['--map=blocksnap:exceptions', t.uri(NAME)])
      assert.notEqual(noContext.code, 0, 'the origin has no exceptions context')
      assert.match(noContext.stderr, /blocksnap:exceptions/)
    }
    // Spot check the 4K snapshot's expectation itself, not only its derivation.
    const s4 = expectedExceptions(4096).filter((x) => x[2] === 1)
    assert.deepEqual(s4.slice(0, 2), [
      [3 * 4096, 2 * 4096, 1],
      [10 * MiB, 128 * 1024, 1],
    ])
  })

  it('nbdcopy into and out of a snapshot export, fio crc32c verify on it; the origin is unchanged', { timeout: TIMEOUT }, async () => {
    const [tcp, unix] = transports(srv) as [Transport, Transport]
    const w = snaps.get('w')!
    randomBytes(16 * MiB).copy(w, 8 * MiB)
    const src = await modelFile('w-in', w)
    await runOk('nbdcopy', ['--connections=4', '--requests=16', '--flush', src, unix.uri(`${NAME}@w`)])
    const dst = join(T, 'w-out.raw')
    await runOk('nbdcopy', ['--connections=2', tcp.uri(`${NAME}@w`), dst])
    assertBytes(await readFile(dst), w, 'nbdcopy out of the snapshot export')
    await rm(dst)

    const job = await fioVerify(tcp.uri(`${NAME}@w`), { iodepth: 16, offset: '40M', size: '8M', timeoutMs: TIMEOUT })
    assert.equal(job.error, 0)
    assert.ok(job.writeBytes >= 8 * MiB && job.readBytes >= 8 * MiB, 'written and read back')

    await assertIdentical(tcp.uri(NAME), join(T, 'origin.raw'), 'origin after snapshot writes')
    await assertIdentical(unix.uri(`${NAME}@s4`), join(T, 's4.raw'), 's4 after writes to w')
    await assertIdentical(tcp.uri(`${NAME}@s64`), join(T, 's64.raw'), 's64 after writes to w')
    // Snapshot writes to w put nothing in the other snapshots' COW.
    const map = await runOk('nbdinfo', ['--map=blocksnap:exceptions', unix.uri(`${NAME}@s4`)])
    assert.deepEqual(parseMap(map.stdout), expectedExceptions(4096))
    // w outside the fio region (40M..48M) still reads what nbdcopy wrote.
    const head = join(T, 'w-head.raw')
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', tcp.uri(`${NAME}@w`), head])
    const got = await readFile(head)
    assertBytes(got.subarray(0, 40 * MiB), w.subarray(0, 40 * MiB), 'w below the fio region')
    assertBytes(got.subarray(48 * MiB), w.subarray(48 * MiB), 'w above the fio region')
    await rm(head)
  })

  it('nbdsh (strict mode off): a read past the end is EINVAL and the connection keeps working', { timeout: TIMEOUT }, async () => {
    const script = `
h.set_strict_mode(0)
size = h.get_size()
${NBDSH_TRY}
t("read past end", lambda: h.pread(4096, size))
t("read straddling", lambda: h.pread(2, size - 1))
t("write past end", lambda: h.pwrite(b"x" * 512, size))
t("33M read", lambda: h.pread(33 << 20, 0))
print("after", h.pread(16, 12388).hex())
`
    for (const [t, e] of [[transports(srv)[0]!, `${NAME}@s4`], [transports(srv)[1]!, NAME]] as const) {
      const out = await nbdsh(t.uri(e), script)
      const expected = (e === NAME ? origin : snaps.get('s4')!).subarray(12388, 12388 + 16).toString('hex')
      assert.deepEqual(out.stdout.trim().split('\n'), [
        'read past end EINVAL',
        'read straddling EINVAL',
        'write past end ENOSPC',
        '33M read EINVAL',
        `after ${expected}`,
      ], `${t.name} ${e}`)
    }
  })

  it('SIGTERM stops the server with exit 0; the origin file holds the model', { timeout: TIMEOUT }, async () => {
    await stopServe(srv)
    assertBytes(await readFile(join(vol, 'origin.img')), origin, 'origin.img after the server stopped')
  })

  it('--read-only: every export is read-only and qemu-io writes are refused', { timeout: TIMEOUT }, async () => {
    const ro = await startServe('ro', ['--read-only'])
    try {
      const [tcp, unix] = transports(ro) as [Transport, Transport]
      const list = JSON.parse((await runOk('nbdinfo', ['--list', '--json', unix.root])).stdout)
      assert.equal(list.exports.length, 4)
      for (const e of list.exports) {
        assert.equal(e.is_read_only, true, e['export-name'])
        assert.equal(e.can_trim, false, e['export-name'])
      }
      for (const [t, e] of [[tcp, NAME], [unix, `${NAME}@s4`]] as const) {
        const denied = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 0 4k', t.uri(e)])
        assert.notEqual(denied.code, 0, `${t.name} ${e}: a write on a read-only export fails`)
        assert.match(denied.stdout + denied.stderr, /read.only|Operation not permitted|permission/i)
      }
      await qemuIo(tcp.uri(NAME), ['read -P 0xb2 10M 128k'], true)
      const refused = await nbdsh(unix.uri(`${NAME}@s64`), `
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, 0); print("ok")
except nbd.Error as e:
    print(e.errno)
`)
      assert.equal(refused.stdout.trim(), 'EPERM')
      await assertIdentical(tcp.uri(NAME), join(T, 'origin.raw'), 'origin under --read-only')
      await assertIdentical(unix.uri(`${NAME}@s64`), join(T, 's64.raw'), 's64 under --read-only')
    } finally {
      await stopServe(ro)
    }
  })

  it('TLS through the CLI: --tls-psk with --tls require; plaintext and a wrong key are refused', { timeout: TIMEOUT }, async () => {
    const psk = join(T, 'keys.psk')
    await writeFile(psk, `alice:${randomBytes(32).toString('hex')}\n`)
    const wrong = join(T, 'wrong.psk')
    await writeFile(wrong, `alice:${randomBytes(32).toString('hex')}\n`)
    const s = await startServe('psk', ['--tls-psk', psk, '--tls', 'require'])
    try {
      const url = (e: string) => `nbds://alice@127.0.0.1:${s.port}/${e}?tls-psk-file=${psk}`
      const info = JSON.parse((await runOk('nbdinfo', ['--json', url(`${NAME}@s4`)])).stdout)
      assert.equal(info.TLS, true)
      assert.deepEqual(info.exports[0].contexts, ['base:allocation', 'blocksnap:exceptions'])
      const map = await runOk('nbdinfo', ['--map=blocksnap:exceptions', url(`${NAME}@s64`)])
      assert.deepEqual(parseMap(map.stdout), expectedExceptions(65536), 'exceptions over TLS')
      const dst = join(T, 'tls-psk.raw')
      await runOk('nbdcopy', [url(`${NAME}@s4`), dst])
      assertBytes(await readFile(dst), snaps.get('s4')!, 'nbdcopy of s4 over TLS-PSK')
      await rm(dst)
      const overUnix = await runOk('nbdinfo', ['--json', `nbds+unix://alice@/${NAME}?socket=${s.sock}&tls-psk-file=${psk}`])
      assert.equal(JSON.parse(overUnix.stdout).TLS, true)

      const plain = await run('nbdinfo', [`nbd://127.0.0.1:${s.port}/${NAME}`])
      assert.notEqual(plain.code, 0, 'plaintext is refused when TLS is required')
      const plainUnix = await run('nbdinfo', [`nbd+unix:///${NAME}?socket=${s.sock}`])
      assert.notEqual(plainUnix.code, 0, 'plaintext is refused on the Unix socket too')
      const bad = await run('nbdinfo', [`nbds://alice@127.0.0.1:${s.port}/${NAME}?tls-psk-file=${wrong}`])
      assert.notEqual(bad.code, 0, 'a wrong PSK is refused')
    } finally {
      await stopServe(s)
    }
    // Misconfigurations are refused up front, with their own message.
    assertError(await cli(['serve', vol, '--listen', '127.0.0.1:0', '--tls', 'require']), 1, /--tls require needs --tls-psk/)
    const badPsk = join(T, 'bad.psk')
    await writeFile(badPsk, 'not a key\n')
    assertError(await cli(['serve', vol, '--listen', '127.0.0.1:0', '--tls-psk', badPsk]), 1, /psk file line 1/)
    assertError(await cli(['serve', vol, '--listen', '127.0.0.1:0', '--tls-psk', join(T, 'missing.psk')]), 1, /TLS: ENOENT/)
    assert.ok(volumeLockFree(vol), 'no lock left behind')
  })

  it('TLS through the CLI: --tls-cert/--tls-key (self-signed) serves nbds:// and refuses plaintext', { timeout: TIMEOUT }, async () => {
    const pki = join(T, 'pki')
    await makeSelfSignedPki(pki)
    const s = await startServe('x509', ['--tls-cert', join(pki, 'server-cert.pem'), '--tls-key', join(pki, 'server-key.pem')])
    try {
      const info = JSON.parse((await runOk('nbdinfo', ['--json', `nbds://localhost:${s.port}/${NAME}@s64?tls-certificates=${pki}`])).stdout)
      assert.equal(info.TLS, true)
      assert.equal(info.exports[0]['export-size'], SIZE)
      const dst = join(T, 'tls-x509.raw')
      await runOk('nbdcopy', [`nbds://127.0.0.1:${s.port}/${NAME}@s64?tls-certificates=${pki}`, dst])
      assertBytes(await readFile(dst), snaps.get('s64')!, 'nbdcopy of s64 over TLS-X.509')
      await rm(dst)
      const plain = await run('nbdinfo', [`nbd://127.0.0.1:${s.port}/${NAME}`])
      assert.notEqual(plain.code, 0, 'certificates alone default to --tls require')
    } finally {
      await stopServe(s)
    }
  })
})
