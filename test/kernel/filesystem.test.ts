/**
 * Interop with the real Linux kernel, issue 6 case 5: a filesystem made and written by the kernel
 * on a blocksnap NBD export. `bin/blocksnap serve VOL` runs on the host; the VM (one boot) gets the
 * export as a virtio disk through qemu's built-in NBD client and:
 *   1. makes an ext4 filesystem (the host's mke2fs, 1 KiB blocks on 64 MiB), mounts it, writes a
 *      tree of files carved from a seeded data disk, syncs and freezes it (fsfreeze, as dm's suspend
 *      does) and waits; the host takes `blocksnap snapshot VOL@s` live through the control socket;
 *   2. thaws and keeps writing (overwrites, appends, holes, truncates, deletes, renames, new files,
 *      one big file), while the host reads the snapshot through the server; then syncs, unmounts
 *      and waits; the host reads the snapshot and the origin again, then `blocksnap merge VOL@s
 *      --wait` runs live (the NBD client stays connected);
 *   3. drops its caches, mounts the merged filesystem read-only and hashes every file.
 * On the host: `e2fsck -fn` finds the snapshot image, the phase-2 origin and the merged origin
 * clean; `debugfs rdump` of each gives exactly the expected tree (model kept here), the merged
 * origin equals the snapshot image byte for byte, and the kernel's hashes match the model.
 */
import assert from 'node:assert/strict'
import { execFile, execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { join, relative } from 'node:path'
import { after, before, test } from 'node:test'
import { Random } from '../support/random.js'
import { type Kernel, type VmRun, CACHE_DIR, missingTools, prepareKernel, runVm, sha256, vmErrors } from './vm.js'
import { freePort } from '../support/free-port.js'
import { ServeProcess } from '../support/serve-process.js'

const MiB = 1024 * 1024
const SIZE = 64 * MiB
const DATA_BYTES = 16 * MiB
const REPO = new URL('../..', import.meta.url).pathname
const BIN = join(REPO, 'bin', 'blocksnap')
const NAME = 'fsvol'
/** Extra modules for ext4, in load order. */
const EXT4_MODULES = ['crc16', 'mbcache', 'jbd2', 'crc32c_generic', 'ext4']
const HOST_TOOLS = ['mke2fs', 'e2fsck', 'debugfs']

type Tree = Map<string, Buffer>
type Op =
  | { op: 'put'; path: string; dataOff: number; len: number }
  | { op: 'patch'; path: string; dataOff: number; len: number; fileOff: number }
  | { op: 'truncate'; path: string; len: number }
  | { op: 'rm'; path: string }
  | { op: 'mv'; from: string; to: string }

let kernel: Kernel
let work = ''
let vol = ''
let port = 0
let server: ServeProcess | null = null
let data: Buffer
let run: VmRun | null = null
let phase1: Tree = new Map()
let phase2: Tree = new Map()
const hostErrors: string[] = []
const timings: string[] = []
let snapLive = '' // snapshot read while the VM was writing phase 2
let snapEnd = '' // snapshot read after phase 2
let midOrigin = '' // origin after phase 2, before the merge
let finalOrigin = ''
let serverStop: { code: number | null; signal: NodeJS.Signals | null } | null = null

// ---- the file-operation model ----------------------------------------------------------------

function apply(tree: Tree, o: Op): void {
  switch (o.op) {
    case 'put':
      tree.set(o.path, Buffer.from(data.subarray(o.dataOff, o.dataOff + o.len)))
      break
    case 'patch': {
      const old = tree.get(o.path)
      assert.ok(old, `patch of a missing file ${o.path}`)
      const out = Buffer.alloc(Math.max(old.length, o.fileOff + o.len))
      old.copy(out)
      data.copy(out, o.fileOff, o.dataOff, o.dataOff + o.len)
      tree.set(o.path, out)
      break
    }
    case 'truncate': {
      const old = tree.get(o.path)
      assert.ok(old, `truncate of a missing file ${o.path}`)
      const out = Buffer.alloc(o.len)
      old.copy(out, 0, 0, Math.min(old.length, o.len))
      tree.set(o.path, out)
      break
    }
    case 'rm':
      assert.ok(tree.delete(o.path), `rm of a missing file ${o.path}`)
      break
    case 'mv': {
      const old = tree.get(o.from)
      assert.ok(old, `mv of a missing file ${o.from}`)
      tree.delete(o.from)
      tree.set(o.to, old)
      break
    }
  }
}

function dirOf(path: string): string {
  const i = path.lastIndexOf('/')
  return i === -1 ? '' : path.slice(0, i)
}

/** Shell lines for ops (paths relative to /mnt/data; DATA is the data disk). */
function shell(ops: readonly Op[]): string {
  const lines: string[] = []
  const dd = 'dd if=/dev/$DATA bs=65536 iflag=skip_bytes,count_bytes,fullblock'
  for (const o of ops) {
    switch (o.op) {
      case 'put':
        if (dirOf(o.path)) lines.push(`mkdir -p "/mnt/data/${dirOf(o.path)}"`)
        lines.push(o.len === 0
          ? `: > "/mnt/data/${o.path}" || R error.put ${o.path}`
          : `${dd} skip=${o.dataOff} count=${o.len} of="/mnt/data/${o.path}" 2>/dev/null || R error.put ${o.path}`)
        break
      case 'patch':
        lines.push(`${dd} skip=${o.dataOff} count=${o.len} of="/mnt/data/${o.path}" oflag=seek_bytes seek=${o.fileOff} conv=notrunc 2>/dev/null || R error.patch ${o.path}`)
        break
      case 'truncate':
        lines.push(`truncate -s ${o.len} "/mnt/data/${o.path}" || R error.truncate ${o.path}`)
        break
      case 'rm':
        lines.push(`rm "/mnt/data/${o.path}" || R error.rm ${o.path}`)
        break
      case 'mv':
        if (dirOf(o.to)) lines.push(`mkdir -p "/mnt/data/${dirOf(o.to)}"`)
        lines.push(`mv "/mnt/data/${o.from}" "/mnt/data/${o.to}" || R error.mv ${o.from}`)
        break
    }
  }
  return lines.join('\n')
}

function fileSize(rnd: Random): number {
  return rnd.pick([0, 1, 100, 1023, 1024, 4096, 4097, 12_345, 65_536 + 7, 300_000, 1 * MiB + 3, 2 * MiB])
}

function piece(rnd: Random, len: number): number {
  return rnd.int(DATA_BYTES - len + 1)
}

/** Phase 1: a tree of files. Phase 2: changes of every kind after the snapshot. */
function makeOps(seed: number): { first: Op[]; second: Op[] } {
  const rnd = new Random(seed)
  const first: Op[] = []
  const tree: Tree = new Map()
  const dirs = ['', 'a', 'a/b', 'c', 'deep/er/still']
  for (let i = 0; i < 40; i++) {
    const len = fileSize(rnd)
    const d = rnd.pick(dirs)
    const o: Op = { op: 'put', path: `${d ? d + '/' : ''}f${i}`, dataOff: piece(rnd, len), len }
    first.push(o)
    apply(tree, o)
  }
  const second: Op[] = []
  const files = (): string[] => [...tree.keys()].sort()
  const push = (o: Op): void => {
    second.push(o)
    apply(tree, o)
  }
  for (let i = 0; i < 60; i++) {
    const kind = rnd.int(8)
    const names = files()
    const f = rnd.pick(names)
    const cur = tree.get(f) as Buffer
    if (kind <= 1) {
      // overwrite inside (or across the end of) the file
      const len = 1 + rnd.int(rnd.chance(0.5) ? 5000 : 200_000)
      push({ op: 'patch', path: f, dataOff: piece(rnd, len), len, fileOff: rnd.int(cur.length + 1) })
    } else if (kind === 2) {
      // append, sometimes after a hole
      const len = 1 + rnd.int(100_000)
      const gap = rnd.chance(0.3) ? rnd.int(3 * MiB) : 0
      push({ op: 'patch', path: f, dataOff: piece(rnd, len), len, fileOff: cur.length + gap })
    } else if (kind === 3) {
      push({ op: 'truncate', path: f, len: rnd.chance(0.5) ? rnd.int(cur.length + 1) : cur.length + rnd.int(MiB) })
    } else if (kind === 4 && names.length > 10) {
      push({ op: 'rm', path: f })
    } else if (kind === 5) {
      push({ op: 'mv', from: f, to: `${rnd.pick(['', 'a', 'moved'])}/m${i}`.replace(/^\//, '') })
    } else {
      const len = fileSize(rnd)
      push({ op: 'put', path: `${rnd.pick(['', 'a/b', 'new'])}/n${i}`.replace(/^\//, ''), dataOff: piece(rnd, len), len })
    }
  }
  // One big rewrite, so the snapshot takes many exceptions.
  push({ op: 'put', path: 'big', dataOff: 0, len: 12 * MiB })
  return { first, second }
}

// ---- host helpers ----------------------------------------------------------------------------

function blocksnap(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(BIN, args, { cwd: REPO, maxBuffer: 1 << 26 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`blocksnap ${args.join(' ')}: ${err.message}\n${stdout}${stderr}`))
      else resolve(stdout)
    })
  })
}

async function timed<T>(label: string, fn: () => Promise<T>): Promise<T> {
  const t = Date.now()
  try {
    return await fn()
  } finally {
    timings.push(`${label} ${((Date.now() - t) / 1000).toFixed(1)} s`)
  }
}

function serverAlive(): boolean {
  return server !== null && server.alive()
}

async function startServer(): Promise<void> {
  port = await freePort()
  server = await ServeProcess.start([vol, '--listen', `127.0.0.1:${port}`])
}

/** e2fsck -fn: exit code and output. */
function fsck(image: string): { code: number; out: string } {
  try {
    const out = execFileSync('e2fsck', ['-fn', image], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
    return { code: 0, out }
  } catch (err) {
    const e = err as { status: number; stdout: string; stderr: string }
    return { code: e.status, out: `${e.stdout}${e.stderr}` }
  }
}

/** The files under /data of an ext4 image, read with debugfs rdump. */
function dumpTree(image: string): Tree {
  const out = join(work, `dump-${Math.random().toString(16).slice(2)}`)
  mkdirSync(out)
  execFileSync('debugfs', ['-R', `rdump /data ${out}`, image], { stdio: ['ignore', 'pipe', 'pipe'] })
  const tree: Tree = new Map()
  const walk = (dir: string): void => {
    for (const name of readdirSync(dir)) {
      const p = join(dir, name)
      if (statSync(p).isDirectory()) walk(p)
      else tree.set(relative(join(out, 'data'), p), readFileSync(p))
    }
  }
  walk(join(out, 'data'))
  rmSync(out, { recursive: true, force: true })
  return tree
}

function assertTree(actual: Tree, expected: Tree, what: string): void {
  assert.deepEqual([...actual.keys()].sort(), [...expected.keys()].sort(), `${what}: file names`)
  for (const [path, bytes] of expected) {
    const got = actual.get(path) as Buffer
    assert.equal(got.length, bytes.length, `${what}: size of ${path}`)
    assert.ok(got.equals(bytes), `${what}: content of ${path}`)
  }
}

/** The kernel's `RESULT <prefix>.<path> <sha256>` lines as a map. */
function kernelHashes(prefix: string): Map<string, string> {
  const out = new Map<string, string>()
  for (const [k, v] of run?.results ?? []) if (k.startsWith(`${prefix}.`)) out.set(k.slice(prefix.length + 1), v)
  return out
}

function modelHashes(tree: Tree): Map<string, string> {
  return new Map([...tree].map(([p, b]) => [p, sha256(b)]))
}

function sortedEntries(m: Map<string, string>): Array<[string, string]> {
  return [...m].sort((a, b) => (a[0] < b[0] ? -1 : 1))
}

// ---- the VM run ------------------------------------------------------------------------------

const VM_SCRIPT = (ops: { first: Op[]; second: Op[] }): string => `
DATA=vda
DEV=vdb
# wait for the host: a line "go" continues, anything else stops
waithost() { read -r reply; [ "$reply" = go ] || { R error.host "$reply"; exit 1; }; }
hashes() { cd /mnt/data && find . -type f | sort | while read -r f; do R "$1.\${f#./}" "$(sha256sum < "$f" | cut -d' ' -f1)"; done; cd /; }
mkdir -p /mnt
/usr/sbin/mke2fs -q -F -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 /dev/$DEV || { R error.mke2fs failed; exit 1; }
mount -t ext4 /dev/$DEV /mnt || { R error.mount failed; exit 1; }
mkdir /mnt/data
${shell(ops.first)}
sync
fsfreeze --freeze /mnt || R error.freeze failed
hashes p1
R phase frozen
waithost
fsfreeze --unfreeze /mnt || R error.thaw failed
${shell(ops.second)}
sync
hashes p2
umount /mnt || R error.umount failed
R phase unmounted
waithost
blockdev --flushbufs /dev/$DEV
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/$DEV /mnt || R error.mount.merged failed
hashes p3
umount /mnt || R error.umount.merged failed
R phase done
`

before(async () => {
  const missing = missingTools()
  for (const t of HOST_TOOLS) {
    try {
      execFileSync('sh', ['-c', `command -v ${t}`], { stdio: 'ignore' })
    } catch {
      missing.push(`${t} (package e2fsprogs)`)
    }
  }
  if (missing.length > 0) throw new Error(`missing host tools: ${missing.join(', ')}`)
  kernel = prepareKernel()
  work = mkdtempSync(join(CACHE_DIR, 'fs-'))
  data = Buffer.from(new Random(61).bytes(DATA_BYTES))
  const dataFile = join(work, 'data.img')
  writeFileSync(dataFile, data)
  const ops = makeOps(62)
  for (const o of ops.first) apply(phase1, o)
  phase2 = new Map(phase1)
  for (const o of ops.second) apply(phase2, o)

  vol = join(work, NAME)
  await blocksnap(['create', vol, '--size', String(SIZE)])
  await startServer()
  snapLive = join(work, 'snap-live.img')
  snapEnd = join(work, 'snap-end.img')
  midOrigin = join(work, 'origin-phase2.img')

  let liveRead: Promise<void> = Promise.resolve()
  const step = (what: string, send: (t: string) => void, fn: () => Promise<void>): void => {
    fn().then(
      () => send('go\n'),
      (err: Error) => {
        hostErrors.push(`${what}: ${err.message}`)
        send('stop\n')
      },
    )
  }
  const onLine = (line: string, send: (t: string) => void): void => {
    if (line === 'RESULT phase frozen') {
      step('snapshot', send, async () => {
        await timed('snapshot', () => blocksnap(['snapshot', `${vol}@s`]))
        // Read the snapshot while the VM writes phase 2 (no wait before "go").
        liveRead = timed('read snapshot during writes', () => blocksnap(['read', `${vol}@s`, '--output', snapLive]).then(() => {}))
        liveRead.catch(() => {})
      })
    } else if (line === 'RESULT phase unmounted') {
      step('merge', send, async () => {
        await liveRead
        await timed('read snapshot', () => blocksnap(['read', `${vol}@s`, '--output', snapEnd]))
        await timed('read origin', () => blocksnap(['read', vol, '--output', midOrigin]))
        await timed('merge --wait', () => blocksnap(['merge', `${vol}@s`, '--wait']))
      })
    }
  }
  try {
    run = await runVm(kernel, {
      disks: [dataFile],
      drives: [`nbd://127.0.0.1:${port}/${NAME}`],
      modules: EXT4_MODULES,
      binaries: ['/usr/sbin/mke2fs'],
      script: VM_SCRIPT(ops),
      onLine,
      timeoutMs: 300_000,
    })
  } finally {
    await liveRead.catch(() => {})
    if (server?.pid !== undefined && serverAlive()) {
      process.kill(server.pid, 'SIGTERM')
      serverStop = await server.exit
    }
  }
  finalOrigin = join(vol, 'origin.img')
})

after(() => {
  if (server?.pid !== undefined && serverAlive()) process.kill(server.pid, 'SIGKILL')
  if (work && !process.env.BLOCKSNAP_KEEP) rmSync(work, { recursive: true, force: true })
  if (run) console.log(`filesystem: kernel ${kernel.version}; VM ${run.seconds.toFixed(1)} s; ${timings.join(', ')}`)
})

test('fs: the VM script ran without errors, the host steps succeeded, the server stopped cleanly', () => {
  assert.ok(run)
  assert.deepEqual(hostErrors, [], `host steps failed; server log:\n${server?.log}`)
  assert.deepEqual(vmErrors(run), [], run.log.slice(-6000))
  assert.equal(run.exitCode, 0)
  assert.equal(run.results.get('phase'), 'done', run.log.slice(-4000))
  assert.deepEqual(serverStop, { code: 0, signal: null }, `server exit; log:\n${server?.log}`)
})

test('fs: the kernel read back what the model says at each phase (snapshot time, after writes, after merge)', () => {
  assert.deepEqual(sortedEntries(kernelHashes('p1')), sortedEntries(modelHashes(phase1)), 'phase 1 (frozen, snapshot time)')
  assert.deepEqual(sortedEntries(kernelHashes('p2')), sortedEntries(modelHashes(phase2)), 'phase 2 (after the writes)')
  assert.deepEqual(sortedEntries(kernelHashes('p3')), sortedEntries(modelHashes(phase1)), 'after the merge: the snapshot-time files')
})

test('fs: the snapshot read through the server (during and after the writes) is a clean fs with the snapshot-time files', () => {
  const live = readFileSync(snapLive)
  const end = readFileSync(snapEnd)
  assert.equal(live.length, SIZE)
  assert.ok(live.equals(end), 'the snapshot did not change while the origin was written')
  const r = fsck(snapEnd)
  assert.equal(r.code, 0, `e2fsck -fn on the snapshot:\n${r.out}`)
  assertTree(dumpTree(snapEnd), phase1, 'snapshot')
})

test('fs: the origin before the merge is a clean fs with the phase-2 files', () => {
  const r = fsck(midOrigin)
  assert.equal(r.code, 0, `e2fsck -fn on the origin:\n${r.out}`)
  assertTree(dumpTree(midOrigin), phase2, 'origin before the merge')
})

test('fs: after the live merge, e2fsck -fn finds the origin clean, its files are the snapshot-time files, bytes equal the snapshot', async () => {
  const r = fsck(finalOrigin)
  assert.equal(r.code, 0, `e2fsck -fn on the merged origin:\n${r.out}`)
  assertTree(dumpTree(finalOrigin), phase1, 'merged origin')
  const merged = readFileSync(finalOrigin)
  assert.equal(sha256(merged), sha256(readFileSync(snapEnd)), 'merged origin == snapshot image')
  const list = await blocksnap(['list', vol])
  assert.doesNotMatch(list, /\bs\b/, `the merged snapshot is gone:\n${list}`)
  await blocksnap(['check', vol])
})
