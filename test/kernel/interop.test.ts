/**
 * Interop with the real Linux dm-snapshot (Debian's kernel under qemu/TCG), issue 6:
 *   1. COW files written by blocksnap load in the kernel (views + dmsetup status equal), and the
 *      kernel keeps appending to them; blocksnap reopens what the kernel appended.
 *   2. COW devices written by the kernel are read identically by blocksnap (library and
 *      `blocksnap import`), and the same trace replayed in blocksnap gives the same results.
 *   3. The kernel merges a blocksnap-made COW while another snapshot exists, blocksnap merges a
 *      kernel-made COW the same way: same final origin, other snapshot unchanged.
 * All checks of a boot are batched into one VM run (see vm.ts).
 */
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { copyFileSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { Random } from '../support/random.js'
import {
  type KernelDisks, type Op, type Results, type Scenario, type ScenarioFiles,
  bigWrite, kernelScript, randomWrites, runInBlocksnap,
} from './scenario.js'
import { type Kernel, type VmRun, CACHE_DIR, diskName, missingTools, prepareKernel, runVm, sha256, vmErrors } from './vm.js'

const MiB = 1024 * 1024
const DATA_BYTES = 6 * MiB
const SIZE = 8 * MiB

/** `count` random writes of up to 64 KiB to `target` (origin 'o' or a snapshot), from the shared data. */
const writes = (r: Random, target: string, count: number) => randomWrites(r, target, count, 64 * 1024, SIZE, DATA_BYTES)

let work = ''
let kernel: Kernel
let data: Uint8Array
let base: Uint8Array
const kernelRuns: VmRun[] = []

/** Builds a VM's disk list: each `add` returns the device name the file gets. */
class Disks {
  readonly files: string[] = []
  add(path: string): string {
    this.files.push(path)
    return diskName(this.files.length - 1)
  }
}

function zeroFile(path: string, bytes: number): string {
  writeFileSync(path, '')
  truncateSync(path, bytes)
  return path
}

/** Snapshot names in the order a scenario attaches them. */
function snapNames(ops: readonly Op[]): string[] {
  return ops.filter((o) => o.op === 'snap').map((o) => (o as { name: string }).name)
}

/** Copies a scenario's files into `dir` (prefix) and returns the copies. */
function copyFiles(files: ScenarioFiles, prefix: string): ScenarioFiles {
  const origin = `${prefix}-origin.img`
  copyFileSync(files.origin, origin)
  const cows = new Map<string, string>()
  for (const [name, path] of files.cows) {
    const p = `${prefix}-${name}.cow`
    copyFileSync(path, p)
    cows.set(name, p)
  }
  return { origin, cows }
}

function freshFiles(prefix: string, originBytes: Uint8Array, cowBytes: Record<string, number>): ScenarioFiles {
  const origin = `${prefix}-origin.img`
  writeFileSync(origin, originBytes)
  const cows = new Map<string, string>()
  for (const [name, bytes] of Object.entries(cowBytes)) cows.set(name, zeroFile(`${prefix}-${name}.cow`, bytes))
  return { origin, cows }
}

function attachDisks(disks: Disks, files: ScenarioFiles, dataDisk: string): KernelDisks {
  const origin = disks.add(files.origin)
  const cows = new Map<string, string>()
  for (const [name, path] of files.cows) cows.set(name, disks.add(path))
  return { origin, cows, data: dataDisk }
}

/** Every key of `expected` has the same value in `actual`; the keys compared are returned. */
function assertSubset(actual: Results, expected: Results, what: string, rename: (key: string) => string = (k) => k): number {
  const diffs: string[] = []
  let n = 0
  for (const [key, value] of expected) {
    const k = rename(key)
    n++
    if (actual.get(k) !== value) diffs.push(`${k}: kernel/actual=${JSON.stringify(actual.get(k))} expected=${JSON.stringify(value)}`)
  }
  assert.deepEqual(diffs, [], `${what}: ${diffs.length} of ${n} differ`)
  return n
}

// ---- scenarios ---------------------------------------------------------------------------

const S4 = { op: 'snap', name: 's4', chunkSectors: 8, store: 'P' } as const
const S8 = { op: 'snap', name: 's8', chunkSectors: 16, store: 'PO' } as const
const S64 = { op: 'snap', name: 's64', chunkSectors: 128, store: 'P' } as const
const S4B = { op: 'snap', name: 's4b', chunkSectors: 8, store: 'P' } as const

function b2kMake(r: Random): Scenario {
  return {
    name: 'b2k',
    sizeBytes: SIZE,
    ops: [
      S4, S8, S64,
      // 5 MiB through the origin: 1280 exceptions of 4 KiB (5 areas), 640 of 8 KiB (2 areas).
      ...bigWrite('o', 0, 5 * MiB, 0),
      ...writes(r, 's4', 10),
      ...writes(r, 's8', 10),
      ...writes(r, 's64', 10),
      S4B,
      ...writes(r, 'o', 20),
      ...writes(r, 's4b', 10),
      { op: 'check', tag: 'made' },
    ],
  }
}

function b2kLoad(r: Random): Scenario {
  return {
    name: 'b2k',
    sizeBytes: SIZE,
    ops: [
      S4, S8, S64, S4B,
      { op: 'check', tag: 'load' },
      ...writes(r, 'o', 20),
      ...writes(r, 's4', 5),
      ...writes(r, 's8', 5),
      ...writes(r, 's64', 5),
      ...writes(r, 's4b', 5),
      { op: 'check', tag: 'more' },
    ],
  }
}

const B2K_COWS = { s4: 8 * MiB, s8: 8 * MiB, s64: 8 * MiB, s4b: 2 * MiB }

const K4 = { op: 'snap', name: 'k4', chunkSectors: 8, store: 'P' } as const
const K8 = { op: 'snap', name: 'k8', chunkSectors: 16, store: 'P' } as const
const K64 = { op: 'snap', name: 'k64', chunkSectors: 128, store: 'PO' } as const

function k2b(r: Random): Scenario {
  return {
    name: 'k2b',
    sizeBytes: SIZE,
    ops: [
      K4,
      // 1.5 MiB through the origin: 384 exceptions of 4 KiB, more than one area (256).
      ...bigWrite('o', 2 * MiB, 1.5 * MiB, 512 * 1024),
      K8,
      ...writes(r, 'o', 30),
      ...writes(r, 'k4', 10),
      ...writes(r, 'k8', 10),
      K64,
      ...writes(r, 'o', 20),
      ...writes(r, 'k64', 10),
      { op: 'check', tag: 'final' },
    ],
  }
}

const K2B_COWS = { k4: 8 * MiB, k8: 4 * MiB, k64: 8 * MiB }

const MA = { op: 'snap', name: 'mA', chunkSectors: 8, store: 'P' } as const
const MB = { op: 'snap', name: 'mB', chunkSectors: 16, store: 'P' } as const

function m3aMake(r: Random): Scenario {
  return {
    name: 'm3a',
    sizeBytes: SIZE,
    ops: [
      MB, MA,
      ...bigWrite('o', 1 * MiB, 1 * MiB, 3 * MiB),
      ...writes(r, 'o', 30),
      ...writes(r, 'mA', 20),
      ...writes(r, 'mB', 5),
      { op: 'check', tag: 'made' },
    ],
  }
}

function m3aMerge(r: Random): Scenario {
  return {
    name: 'm3a',
    sizeBytes: SIZE,
    ops: [
      MB, MA,
      { op: 'check', tag: 'pre' },
      { op: 'merge', name: 'mA', during: writes(r, 'o', 10) },
      { op: 'check', tag: 'post' },
      ...writes(r, 'o', 10),
      { op: 'check', tag: 'after' },
    ],
  }
}

const M3A_COWS = { mA: 8 * MiB, mB: 8 * MiB }

function k3b(r: Random): Scenario {
  return {
    name: 'k3b',
    sizeBytes: SIZE,
    ops: [
      K4, K8, K64,
      { op: 'check', tag: 'pre' },
      { op: 'merge', name: 'k8', during: writes(r, 'o', 10) },
      { op: 'check', tag: 'post' },
    ],
  }
}

// ---- state shared by the tests -----------------------------------------------------------

const bs = new Map<string, Results>() // blocksnap results per step
let boot1: VmRun
let boot2: VmRun
let b2kKernelFiles: ScenarioFiles
let k2bKernelFiles: ScenarioFiles
let k2bBlocksnapFiles: ScenarioFiles

before(async () => {
  const missing = missingTools()
  if (missing.length > 0) throw new Error(`missing host tools: ${missing.join(', ')}`)
  kernel = prepareKernel()
  work = mkdtempSync(join(CACHE_DIR, 'interop-'))
  data = new Random(1).bytes(DATA_BYTES)
  base = new Random(2).bytes(SIZE)
  const dataFile = join(work, 'data.img')
  writeFileSync(dataFile, data)

  // ---- boot 1: case 1 (load blocksnap COWs), case 2 (kernel writes), case 3a (kernel merge)
  const disks = new Disks()
  const dataDisk = disks.add(dataFile)
  const script: string[] = []

  // Case 1: blocksnap makes the COWs; the kernel loads copies and keeps writing; blocksnap
  // replays the same continuation on other copies.
  const b2kMade = freshFiles(join(work, 'b2k'), base, B2K_COWS)
  bs.set('b2k.make', await runInBlocksnap(b2kMake(new Random(10)), b2kMade, data))
  b2kKernelFiles = copyFiles(b2kMade, join(work, 'b2k-kernel'))
  const b2kBsFiles = copyFiles(b2kMade, join(work, 'b2k-bs'))
  script.push(kernelScript(b2kLoad(new Random(11)), attachDisks(disks, b2kKernelFiles, dataDisk)))
  bs.set('b2k.load', await runInBlocksnap(b2kLoad(new Random(11)), b2kBsFiles, data))

  // Case 2: the same trace in the kernel (fresh COWs) and in blocksnap (other fresh COWs).
  k2bKernelFiles = freshFiles(join(work, 'k2b-kernel'), base, K2B_COWS)
  k2bBlocksnapFiles = freshFiles(join(work, 'k2b-bs'), base, K2B_COWS)
  script.push(kernelScript(k2b(new Random(20)), attachDisks(disks, k2bKernelFiles, dataDisk)))
  bs.set('k2b', await runInBlocksnap(k2b(new Random(20)), k2bBlocksnapFiles, data))

  // Case 3a: blocksnap makes two COWs; the kernel merges one of them while the other stays.
  const m3aMade = freshFiles(join(work, 'm3a'), base, M3A_COWS)
  bs.set('m3a.make', await runInBlocksnap(m3aMake(new Random(30)), m3aMade, data))
  const m3aKernel = copyFiles(m3aMade, join(work, 'm3a-kernel'))
  script.push(kernelScript(m3aMerge(new Random(31)), attachDisks(disks, m3aKernel, dataDisk)))
  bs.set('m3a.merge', await runInBlocksnap(m3aMerge(new Random(31)), copyFiles(m3aMade, join(work, 'm3a-bs')), data))

  boot1 = await runVm(kernel, { disks: disks.files, script: script.join('\n') })
  kernelRuns.push(boot1)

  // ---- boot 2: case 3b, the kernel-written COWs of case 2 merged by both.
  const disks2 = new Disks()
  const dataDisk2 = disks2.add(dataFile)
  const k3bKernel = copyFiles(k2bKernelFiles, join(work, 'k3b-kernel'))
  const k3bBs = copyFiles(k2bKernelFiles, join(work, 'k3b-bs'))
  const script2 = kernelScript(k3b(new Random(40)), attachDisks(disks2, k3bKernel, dataDisk2))
  bs.set('k3b', await runInBlocksnap(k3b(new Random(40)), k3bBs, data))
  boot2 = await runVm(kernel, { disks: disks2.files, script: script2 })
  kernelRuns.push(boot2)
})

after(() => {
  if (work && !process.env.BLOCKSNAP_KEEP) rmSync(work, { recursive: true, force: true })
  const secs = kernelRuns.map((r) => r.seconds.toFixed(1)).join(' + ')
  if (kernel) console.log(`kernel ${kernel.version} (${kernel.packageName}); VM runs: ${secs} s`)
})

test('the VM scripts ran without dmsetup/dd errors', () => {
  assert.equal(boot1.exitCode, 0)
  assert.deepEqual(vmErrors(boot1), [])
  assert.equal(boot2.exitCode, 0)
  assert.deepEqual(vmErrors(boot2), [])
})

test('case 1: COWs written by blocksnap load in the kernel with the same views and status', () => {
  const made = bs.get('b2k.make') as Results
  assert.ok(/^0 16384 snapshot \d+\/16384 \d+$/.test(made.get('b2k.made.status.s4') ?? ''), made.get('b2k.made.status.s4'))
  const n = assertSubset(boot1.results, made, 'kernel load of blocksnap COWs', (k) => k.replace('.made.', '.load.'))
  assert.ok(n >= 9)
})

test('case 1: the kernel appends to blocksnap-made COWs exactly as blocksnap does', () => {
  assertSubset(boot1.results, bs.get('b2k.load') as Results, 'continued writes')
})

test('case 1: blocksnap reopens the COWs the kernel appended to', async () => {
  const reopen: Scenario = { name: 'b2k', sizeBytes: SIZE, ops: [S4, S8, S64, S4B, { op: 'check', tag: 'more' }] }
  const res = await runInBlocksnap(reopen, b2kKernelFiles, data)
  assertSubset(boot1.results, res, 'reopened kernel-appended COWs')
})

test('case 2: the kernel and blocksnap give the same views and status for the same trace', () => {
  assertSubset(boot1.results, bs.get('k2b') as Results, 'kernel vs blocksnap trace')
})

test('case 2: blocksnap reads COWs written by the kernel identically (library)', async () => {
  const files = copyFiles(k2bKernelFiles, join(work, 'k2b-import'))
  const res = await runInBlocksnap({ name: 'k2b', sizeBytes: SIZE, ops: [K4, K8, K64, { op: 'check', tag: 'final' }] }, files, data)
  assertSubset(boot1.results, res, 'imported kernel COWs')
})

test('case 2: `blocksnap import` adopts kernel COWs; status and read match the kernel', () => {
  const vol = join(work, 'vol-k2b')
  const cli = (...args: string[]): string =>
    execFileSync(join(process.cwd(), 'bin/blocksnap'), args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
  cli('create', vol, '--from', k2bKernelFiles.origin)
  for (const name of ['k4', 'k8', 'k64']) {
    cli('import', `${vol}@${name}`, '--cow', k2bKernelFiles.cows.get(name) as string)
    assert.equal(cli('status', `${vol}@${name}`).trim(), boot1.results.get(`k2b.final.status.${name}`))
    const out = join(work, `read-${name}`)
    cli('read', `${vol}@${name}`, '--output', out)
    assert.equal(sha256(readFileSync(out)), boot1.results.get(`k2b.final.sha.${name}`), `sha of ${name}`)
  }
  const out = join(work, 'read-origin')
  cli('read', vol, '--output', out)
  assert.equal(sha256(readFileSync(out)), boot1.results.get('k2b.final.sha.o'))
})

test('case 2: COW bytes written by the kernel and by blocksnap for the same trace', () => {
  // Not required for compatibility (allocation order may legitimately differ), but with direct,
  // sequential I/O both should allocate in the same order: report which files match.
  const same: string[] = []
  const differ: string[] = []
  for (const name of k2bKernelFiles.cows.keys()) {
    const a = readFileSync(k2bKernelFiles.cows.get(name) as string)
    const b = readFileSync(k2bBlocksnapFiles.cows.get(name) as string)
    ;(Buffer.compare(a, b) === 0 ? same : differ).push(name)
  }
  const originSame = Buffer.compare(readFileSync(k2bKernelFiles.origin), readFileSync(k2bBlocksnapFiles.origin)) === 0
  console.log(`k2b COW files byte-identical: [${same.join(' ')}], different: [${differ.join(' ')}]; origin identical: ${originSame}`)
  assert.ok(originSame)
})

test('case 3a: the kernel merges a blocksnap-made COW with another snapshot present, like blocksnap', () => {
  const res = bs.get('m3a.merge') as Results
  assertSubset(boot1.results, res, 'merge of blocksnap COW')
  const merged = boot1.results.get('m3a.merge.mA') ?? ''
  const m = /^0 16384 snapshot-merge (\d+)\/\d+ (\d+)$/.exec(merged)
  assert.ok(m && m[1] === m[2], merged)
  // The other snapshot is unchanged by the merge.
  assert.equal(boot1.results.get('m3a.post.sha.mB'), boot1.results.get('m3a.pre.sha.mB'))
  // The merged origin shows what the merged snapshot showed, plus the writes made during the merge.
  assert.equal(res.get('m3a.pre.sha.mA'), (bs.get('m3a.make') as Results).get('m3a.made.sha.mA'))
})

test('case 3b: blocksnap merges a kernel-made COW with other snapshots present, like the kernel', () => {
  const res = bs.get('k3b') as Results
  assertSubset(boot2.results, res, 'merge of kernel COW')
  const merged = boot2.results.get('k3b.merge.k8') ?? ''
  const m = /^0 16384 snapshot-merge (\d+)\/\d+ (\d+)$/.exec(merged)
  assert.ok(m && m[1] === m[2], merged)
  for (const other of ['k4', 'k64']) {
    assert.equal(boot2.results.get(`k3b.post.sha.${other}`), boot1.results.get(`k2b.final.sha.${other}`), `${other} unchanged`)
  }
  assert.equal(boot2.results.get('k3b.pre.sha.k8'), boot1.results.get('k2b.final.sha.k8'))
})
