/**
 * Interop: real NBD clients (libnbd's nbdinfo/nbdcopy/nbdsh, qemu-img/qemu-io, fio) against an
 * in-process NbdServer on 127.0.0.1 and on a Unix socket, plain and over TLS (PSK and X.509).
 * A missing tool fails the test with an install hint; CI installs them.
 */
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import type { BlockDevice } from '../../src/device/block-device.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { staticExports, type BlockStatusExtent, type NbdExport } from '../../src/nbd/export.js'
import { loadTlsFiles } from '../../src/nbd/tls.js'
import { logsAreClean, startTestServer, type TestServer } from '../support/nbd-test-server.js'
import { NBDSH_TRY, fioVerify, makeSelfSignedPki, nbdsh, requireTools, run, runOk } from '../support/nbd-tools.js'

/** Every test and hook fails instead of hanging if a connection never closes. */
const TIMEOUT = 120_000
const MiB = 1024 * 1024
const ZERO_PIECE = Buffer.alloc(65536)

/**
 * A zero-detecting block status: base:allocation says hole+zero for all-zero 64 KiB pieces,
 * and the custom context marks non-zero pieces as "in COW". Answers at most 256 KiB per call:
 * short answers are allowed (clients ask again), and qemu asks with REQ_ONE over and over, so a
 * provider that scans far ahead makes qemu-img quadratic.
 */
function zeroDetect(device: BlockDevice) {
  return async (context: string, offset: number, length: number): Promise<BlockStatusExtent[]> => {
    const end = Math.min(offset + length, device.sizeBytes, offset + 256 * 1024)
    const out: BlockStatusExtent[] = []
    for (let at = offset; at < end; ) {
      const n = Math.min(65536 - (at % 65536), end - at)
      const zero = Buffer.from(await device.read(at, n)).equals(ZERO_PIECE.subarray(0, n))
      out.push({ length: n, flags: context === 'base:allocation' ? (zero ? 3 : 0) : zero ? 0 : 1 })
      at += n
    }
    return out
  }
}

function exportOf(name: string, device: BlockDevice, extra: Partial<NbdExport> = {}): NbdExport {
  return { name, device, readOnly: false, metaContexts: ['blocksnap:exceptions'], blockStatus: zeroDetect(device), ...extra }
}

let dir: string
let srv: TestServer
let unixSrv: TestServer
let sockPath: string
let disk: MemoryDevice
let scratch: MemoryDevice
let roBytes: Buffer
let U: string

before(async () => {
  await requireTools('nbdinfo', 'nbdcopy', 'nbdsh', 'qemu-img', 'qemu-io', 'fio', 'openssl')
  dir = await mkdtemp(join(tmpdir(), 'nbd-interop-'))
  disk = new MemoryDevice(64 * MiB, { name: 'disk' })
  scratch = new MemoryDevice(64 * MiB, { name: 'scratch' })
  roBytes = randomBytes(4 * MiB)
  const ro = MemoryDevice.fromBytes(roBytes, { readOnly: true })
  const exports = staticExports([
    exportOf('disk', disk, { description: 'test disk' }),
    exportOf('scratch', scratch),
    { name: 'ro', device: ro, readOnly: true },
    { name: 'fio', device: new MemoryDevice(32 * MiB), readOnly: false },
  ])
  srv = await startTestServer({ exports })
  sockPath = join(dir, 'nbd.sock')
  unixSrv = await startTestServer({ exports }, { path: sockPath })
  U = `nbd://127.0.0.1:${srv.port}`
}, { timeout: TIMEOUT })

after(async () => {
  await srv?.close()
  await unixSrv?.close()
  if (dir) await rm(dir, { recursive: true, force: true })
  if (srv) assert.ok(logsAreClean(srv.logs), srv.logs.filter((l) => !l.startsWith('debug')).join('\n'))
}, { timeout: TIMEOUT })

test('interop: nbdinfo --list, --json and --map', { timeout: TIMEOUT }, async () => {
  const list = await runOk('nbdinfo', ['--list', U])
  for (const name of ['disk', 'scratch', 'ro', 'fio']) assert.match(list.stdout, new RegExp(`export="${name}"`))
  assert.match(list.stdout, /description: test disk/)

  const json = JSON.parse((await runOk('nbdinfo', ['--json', `${U}/disk`])).stdout)
  const info = json.exports[0]
  assert.equal(json.protocol, 'newstyle-fixed')
  assert.equal(json.TLS, false)
  assert.equal(info['export-size'], 64 * MiB)
  assert.deepEqual(info.contexts, ['base:allocation', 'blocksnap:exceptions'])
  for (const can of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_cache', 'can_df', 'can_multi_conn']) {
    assert.equal(info[can], true, can)
  }
  assert.equal(info.is_read_only, false)
  assert.equal(info.block_size_minimum, 1)
  assert.equal(info.block_size_preferred, 4096)
  assert.equal(info.block_size_maximum, 32 * MiB)
  const ro = JSON.parse((await runOk('nbdinfo', ['--json', `${U}/ro`])).stdout).exports[0]
  assert.equal(ro.is_read_only, true)
  assert.equal(ro.can_trim, false)

  await disk.write(Buffer.alloc(65536, 7), 2 * MiB)
  const map = await runOk('nbdinfo', ['--map', `${U}/disk`])
  assert.deepEqual(
    map.stdout.trim().split('\n').map((line) => line.trim().split(/\s+/).slice(0, 3).map(Number)),
    [
      [0, 2 * MiB, 3],
      [2 * MiB, 65536, 0],
      [2 * MiB + 65536, 62 * MiB - 65536, 3],
    ],
  )
  const cow = await runOk('nbdinfo', ['--map=blocksnap:exceptions', `${U}/disk`])
  assert.match(cow.stdout, new RegExp(`^\\s*${2 * MiB}\\s+65536\\s+1`, 'm'))
  await disk.discard(2 * MiB, 65536)
})

test('interop: qemu-io patterned write/read, FUA, write-zeroes and discard', { timeout: TIMEOUT }, async () => {
  const url = `${U}/disk`
  const out = await runOk('qemu-io', [
    '-f', 'raw',
    '-c', 'write -P 0xab 0 64k',
    '-c', 'read -P 0xab 0 64k',
    '-c', 'write -P 0x42 -f 1M 64k',
    '-c', 'read -P 0x42 1M 64k',
    '-c', 'write -P 0x33 4M 2M',
    '-c', 'write -z 4M 512k',
    '-c', 'write -z -u 5M 512k',
    '-c', 'discard 5632k 256k',
    '-c', 'read -P 0 4M 512k',
    '-c', 'read -P 0x33 4608k 512k',
    '-c', 'read -P 0 5M 768k',
    '-c', 'read -P 0x33 5888k 256k',
    '-c', 'write -P 0x11 12345 1000',
    '-c', 'read -P 0x11 12345 1000',
    '-c', 'flush',
    url,
  ])
  assert.doesNotMatch(out.stdout + out.stderr, /Pattern verification failed|error/i)
  assert.deepEqual(await disk.read(4 * MiB + 512 * 1024, 4), new Uint8Array([0x33, 0x33, 0x33, 0x33]))
  const denied = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', `${U}/ro`])
  assert.match(denied.stdout + denied.stderr, /read.only|Operation not permitted|permission/i)
  await disk.discard(0, 8 * MiB)
})

test('interop: qemu-img convert both ways, compare and map', { timeout: TIMEOUT }, async () => {
  const src = join(dir, 'src.raw')
  const back = join(dir, 'back.raw')
  const content = Buffer.alloc(16 * MiB)
  randomBytes(4 * MiB).copy(content, 0)
  randomBytes(MiB).copy(content, 10 * MiB)
  await writeFile(src, content)
  await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', '-m', '8', '-W', src, `${U}/scratch`])
  await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `${U}/scratch`, back])
  const copied = await readFile(back)
  assert.equal(copied.length, 64 * MiB)
  assert.ok(copied.subarray(0, 16 * MiB).equals(content), 'round trip through the export')
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', back, `${U}/scratch`])
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr)
  assert.match(cmp.stdout, /Images are identical/)
  const map = JSON.parse((await runOk('qemu-img', ['map', '-f', 'raw', '--output=json', `${U}/scratch`])).stdout) as { start: number; length: number; data: boolean; zero: boolean }[]
  assert.deepEqual(map.find((m) => m.start === 0), { ...map.find((m) => m.start === 0)!, data: true, length: 4 * MiB })
  assert.ok(map.some((m) => m.start === 4 * MiB && !m.data && m.zero), 'zero ranges reported as holes')
  await scratch.discard(0, 64 * MiB)
})

test('interop: nbdcopy to and from the export, with several connections', { timeout: TIMEOUT }, async () => {
  const src = join(dir, 'copy-src.raw')
  const dst = join(dir, 'copy-dst.raw')
  const content = Buffer.alloc(64 * MiB)
  for (let at = 0; at < content.length; at += 8 * MiB) randomBytes(MiB).copy(content, at + 3 * MiB)
  await writeFile(src, content)
  await runOk('nbdcopy', ['--connections=4', '--requests=32', '--flush', src, `${U}/scratch`])
  assert.ok(Buffer.from(await scratch.read(0, 64 * MiB)).equals(content))
  await runOk('nbdcopy', ['--connections=4', `${U}/scratch`, dst])
  assert.ok((await readFile(dst)).equals(content))
  await runOk('nbdcopy', [`${U}/ro`, join(dir, 'ro.raw')])
  assert.ok((await readFile(join(dir, 'ro.raw'))).equals(roBytes))
  await scratch.discard(0, 64 * MiB)
})

test('interop: fio nbd engine with crc32c verification', { timeout: TIMEOUT }, async () => {
  const job = await fioVerify(`${U}/fio`, { iodepth: 32, size: '32M', timeoutMs: 120_000 })
  assert.equal(job.error, 0)
  assert.ok(job.writeBytes >= 32 * MiB, 'everything written')
  assert.ok(job.readBytes >= 32 * MiB, 'and read back for verification')
})

test('interop: nbdsh bad requests (strict mode off) get the spec errnos and keep the connection', { timeout: TIMEOUT }, async () => {
  const script = `
h.set_strict_mode(0)
size = h.get_size()
${NBDSH_TRY}
t("read past end", lambda: h.pread(4096, size))
t("read straddling", lambda: h.pread(2, size - 1))
t("write past end", lambda: h.pwrite(b"x" * 4096, size))
t("zero past end", lambda: h.zero(4096, size))
t("trim past end", lambda: h.trim(4096, size))
t("cache past end", lambda: h.cache(4096, size))
t("bad flag", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
t("write req_one", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_REQ_ONE))
t("fast zero", lambda: h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO))
t("fast zero no hole", lambda: h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE))
t("len 0 read", lambda: h.pread(0, 0))
t("len 0 write", lambda: h.pwrite(b"", 0))
t("33M read", lambda: h.pread(33 << 20, 0))
t("33M write", lambda: h.pwrite(b"y" * (33 << 20), 0))
t("after", lambda: h.pread(512, 0))
`
  const rw = await nbdsh(`${U}/disk`, script)
  assert.deepEqual(Object.fromEntries(rw.stdout.trim().split('\n').map((l) => [l.slice(0, l.lastIndexOf(' ')), l.slice(l.lastIndexOf(' ') + 1)])), {
    'read past end': 'EINVAL',
    'read straddling': 'EINVAL',
    'write past end': 'ENOSPC',
    'zero past end': 'ENOSPC',
    'trim past end': 'EINVAL',
    'cache past end': 'EINVAL',
    'bad flag': 'EINVAL',
    'write req_one': 'EINVAL',
    'fast zero': 'ok',
    'fast zero no hole': 'ENOTSUP',
    'len 0 read': 'ok',
    'len 0 write': 'ok',
    '33M read': 'EINVAL',
    '33M write': 'EINVAL',
    after: 'ok',
  })
  const ro = await nbdsh(
    `${U}/ro`,
    `
h.set_strict_mode(0)
for name, fn in [("write", lambda: h.pwrite(b"x" * 512, 0)), ("trim", lambda: h.trim(512, 0)),
                 ("zero", lambda: h.zero(512, 0)), ("read", lambda: h.pread(512, 0))]:
    try:
        fn(); print(name, "ok")
    except nbd.Error as e:
        print(name, e.errno)
`,
  )
  assert.deepEqual(ro.stdout.trim().split('\n'), ['write EPERM', 'trim EPERM', 'zero EPERM', 'read ok'])
})

test('interop: nbdsh handshake variants: simple replies, plain newstyle, zero padding, no block size, opt mode', { timeout: TIMEOUT }, async () => {
  const url = `${U}/disk`
  const variants = [
    [`h.set_request_structured_replies(False)`, `print(h.get_structured_replies_negotiated(), h.can_df())`, 'False False'],
    [`h.set_handshake_flags(0)`, `print(h.get_protocol())`, 'newstyle'],
    [`h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)`, `print(h.get_protocol(), h.get_size())`, `newstyle-fixed ${64 * MiB}`],
    [`h.set_request_block_size(False)`, `print(h.get_block_size(nbd.SIZE_PREFERRED))`, '4096'],
  ] as const
  for (const [setup, probe, expected] of variants) {
    const out = await nbdsh(null, `${setup}\nh.connect_uri('${url}')\nh.pwrite(b'v' * 1000, 777)\nassert h.pread(1000, 777) == b'v' * 1000\n${probe}`)
    assert.equal(out.stdout.trim(), expected, setup)
  }
  const opt = await nbdsh(
    null,
    `
h.set_opt_mode(True)
h.connect_uri('${U}')
names = []
h.opt_list(lambda n, d: names.append((n, d)))
print(names)
h.set_export_name('ro')
h.opt_info()
print(h.get_size(), h.is_read_only())
h.opt_abort()
`,
  )
  assert.equal(opt.stdout.trim(), `[('disk', 'test disk'), ('scratch', ''), ('ro', ''), ('fio', '')]\n${4 * MiB} True`)
  const status = await nbdsh(
    url,
    `
entries = []
h.block_status(65536, 32 << 20, lambda ctx, off, ents, err: entries.append((ctx, off, list(ents))))
h.block_status(65536, 32 << 20, lambda ctx, off, ents, err: entries.append((ctx, off, list(ents))), nbd.CMD_FLAG_REQ_ONE)
print(sorted(entries))
`,
    ['--base-allocation'],
  )
  assert.equal(status.stdout.trim(), "[('base:allocation', 33554432, [65536, 3]), ('base:allocation', 33554432, [65536, 3])]")
})

test('interop: multi-conn: flush on one connection is visible on another; 64 pipelined aio writes', { timeout: TIMEOUT }, async () => {
  const url = `${U}/disk`
  const out = await nbdsh(
    null,
    `
h1 = nbd.NBD(); h1.connect_uri('${url}'); h2 = nbd.NBD(); h2.connect_uri('${url}')
assert h1.can_multi_conn()
h1.pwrite(b'\\x5a' * 4096, 8 << 20); h1.flush()
assert h2.pread(4096, 8 << 20) == b'\\x5a' * 4096
cookies = [h1.aio_pwrite(bytes([i]) * 4096, (16 << 20) + i * 4096) for i in range(64)]
while h1.aio_in_flight() > 0: h1.poll(-1)
for c in cookies: h1.aio_command_completed(c)
assert all(h2.pread(4096, (16 << 20) + i * 4096) == bytes([i]) * 4096 for i in range(64))
print('ok')
`,
    ['-n'],
  )
  assert.equal(out.stdout.trim(), 'ok')
  await disk.discard(0, 32 * MiB)
})

test('interop: latency: qemu-img bench at queue depth 8 over TCP has no per-batch stall', { timeout: TIMEOUT }, async () => {
  // qemu-nbd without TCP_NODELAY stalls ~40 ms per batch here (reference §14: 2000 x 4k took 5.2 s).
  // Our replies leave in corked batches, so this guards latency in general, not NODELAY alone.
  for (const write of [false, true]) {
    const out = await runOk('qemu-img', ['bench', '-f', 'raw', ...(write ? ['-w'] : []), '-c', '2000', '-d', '8', '-s', '4k', `${U}/fio`])
    const seconds = Number(/Run completed in ([\d.]+) seconds/.exec(out.stdout)?.[1])
    assert.ok(seconds < 1.5, `2000 requests took ${seconds} s`)
  }
})

test('interop: Unix socket with nbdinfo, qemu-io and nbdcopy', { timeout: TIMEOUT }, async () => {
  const url = (name: string) => `nbd+unix:///${name}?socket=${sockPath}`
  const info = await runOk('nbdinfo', ['--size', url('ro')])
  assert.equal(info.stdout.trim(), String(4 * MiB))
  await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 3M 128k', '-c', 'read -P 0x77 3M 128k', url('scratch')])
  const dst = join(dir, 'unix.raw')
  await runOk('nbdcopy', [url('ro'), dst])
  assert.ok((await readFile(dst)).equals(roBytes))
  await scratch.discard(0, 64 * MiB)
})

test('interop: TLS with PSK (nbds://) and X.509 certificates; TLS required refuses plaintext', { timeout: TIMEOUT }, async () => {
  const pki = join(dir, 'pki')
  await makeSelfSignedPki(pki)
  const pskFile = join(dir, 'keys.psk')
  await writeFile(pskFile, `alice:${randomBytes(32).toString('hex')}\n`)
  const wrongPsk = join(dir, 'wrong.psk')
  await writeFile(wrongPsk, `alice:${randomBytes(32).toString('hex')}\n`)

  const device = new MemoryDevice(8 * MiB)
  const exports = staticExports([{ name: 'sec', device, readOnly: false }])
  // File paths straight to the server (read at listen), as the CLI passes them.
  const psk = await startTestServer({ exports, tls: { mode: 'require', pskFile } })
  // The server's certificate directory carries ca-cert.pem too, but a client-CA would demand
  // client certificates, so only the server pair is loaded.
  const x509 = await startTestServer({
    exports,
    tls: await loadTlsFiles({ mode: 'allow', certFile: join(pki, 'server-cert.pem'), keyFile: join(pki, 'server-key.pem') }),
  })
  try {
    const pskUrl = `nbds://alice@127.0.0.1:${psk.port}/sec?tls-psk-file=${pskFile}`
    const info = await runOk('nbdinfo', [pskUrl])
    assert.match(info.stdout, /newstyle-fixed with TLS, using structured packets/)
    const src = join(dir, 'tls-src.raw')
    const content = randomBytes(8 * MiB)
    await writeFile(src, content)
    await runOk('nbdcopy', [src, pskUrl])
    assert.ok(Buffer.from(await device.read(0, 8 * MiB)).equals(content))
    const wrong = await run('nbdinfo', [`nbds://alice@127.0.0.1:${psk.port}/sec?tls-psk-file=${wrongPsk}`])
    assert.notEqual(wrong.code, 0, 'a wrong PSK is refused')
    const plain = await run('nbdinfo', [`nbd://127.0.0.1:${psk.port}/sec`])
    assert.notEqual(plain.code, 0, 'plaintext is refused when TLS is required')

    const certUrl = `nbds://localhost:${x509.port}/sec?tls-certificates=${pki}`
    const certInfo = await runOk('nbdinfo', ['--json', certUrl])
    assert.equal(JSON.parse(certInfo.stdout).TLS, true)
    const dst = join(dir, 'tls-dst.raw')
    await runOk('nbdcopy', [`nbds://127.0.0.1:${x509.port}/sec?tls-certificates=${pki}`, dst])
    assert.ok((await readFile(dst)).equals(content))
    const optional = await runOk('nbdinfo', ['--json', `nbd://127.0.0.1:${x509.port}/sec`])
    assert.equal(JSON.parse(optional.stdout).TLS, false, "mode 'allow' still serves plaintext clients")
  } finally {
    await psk.close()
    await x509.close()
  }
  assert.ok(logsAreClean(psk.logs) && logsAreClean(x509.logs))
})
