/**
 * Regenerates test/fixtures/kernel/: COW images written by the real kernel (dm-snapshot in the
 * VM), gzip-compressed, with the kernel's sha256 of every view and its dmsetup status lines in
 * expected.json. test/integration/kernel-fixtures.test.ts checks blocksnap reads them identically.
 *
 *   npx tsx test/kernel/make-fixtures.ts
 *
 * The origin and the written data are compressible patterns (the sector number in text), so
 * the images stay small. The same scenario is also replayed in blocksnap here, as a check.
 */
import { mkdtempSync, mkdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'
import { Random } from '../support/random.js'
import { type Scenario, type ScenarioFiles, bigWrite, kernelScript, randomWrites, runInBlocksnap } from './scenario.js'
import { CACHE_DIR, diskName, prepareKernel, runVm, vmErrors } from './vm.js'

const KiB = 1024
const MiB = 1024 * KiB
export const FIXTURE_SIZE = 2 * MiB
const DATA_BYTES = 2 * MiB

/** 512-byte sectors holding `${label} sector NNNNNNNN` repeated: compressible, all different. */
export function patternImage(label: string, bytes: number): Uint8Array {
  const out = new Uint8Array(bytes)
  const enc = new TextEncoder()
  for (let s = 0; s < bytes / 512; s++) {
    const line = enc.encode(`${label} sector ${String(s).padStart(8, '0')}\n`)
    for (let i = 0; i < 512; i++) out[s * 512 + i] = line[i % line.length] as number
  }
  return out
}

const COWS: Record<string, number> = {
  f4: 2 * MiB, // 4 KiB chunks, more than one metadata area (256 entries)
  f512: 2 * MiB, // 512-byte chunks: 32 entries per area, many areas
  f8: 1 * MiB,
  f64: 3 * MiB, // PO
  finv: 64 * KiB, // too small: the kernel invalidates it
  fm: 1 * MiB, // merged by the kernel, then attached again (empty table)
}

function scenario(r: Random): Scenario {
  const S = FIXTURE_SIZE
  return {
    name: 'fx',
    sizeBytes: S,
    ops: [
      { op: 'snap', name: 'f4', chunkSectors: 8, store: 'P' },
      { op: 'snap', name: 'f512', chunkSectors: 1, store: 'P' },
      ...bigWrite('o', 0, 1.25 * MiB, 0),
      { op: 'snap', name: 'f8', chunkSectors: 16, store: 'P' },
      { op: 'snap', name: 'finv', chunkSectors: 8, store: 'P' },
      { op: 'snap', name: 'f64', chunkSectors: 128, store: 'PO' },
      { op: 'snap', name: 'fm', chunkSectors: 8, store: 'P' },
      ...randomWrites(r, 'o', 20, 32 * KiB, S, DATA_BYTES),
      ...randomWrites(r, 'f4', 5, 16 * KiB, S, DATA_BYTES),
      ...randomWrites(r, 'f512', 5, 16 * KiB, S, DATA_BYTES),
      ...randomWrites(r, 'f8', 5, 16 * KiB, S, DATA_BYTES),
      ...randomWrites(r, 'f64', 5, 16 * KiB, S, DATA_BYTES),
      ...randomWrites(r, 'fm', 5, 16 * KiB, S, DATA_BYTES),
      { op: 'check', tag: 'pre' },
      { op: 'merge', name: 'fm', during: randomWrites(r, 'o', 3, 16 * KiB, S, DATA_BYTES) },
      { op: 'snap', name: 'fm', chunkSectors: 8, store: 'P' },
      { op: 'check', tag: 'final' },
    ],
  }
}

function files(dir: string, prefix: string, origin: Uint8Array): ScenarioFiles {
  const o = join(dir, `${prefix}-origin.img`)
  writeFileSync(o, origin)
  const cows = new Map<string, string>()
  for (const [name, bytes] of Object.entries(COWS)) {
    const p = join(dir, `${prefix}-${name}.cow`)
    writeFileSync(p, '')
    truncateSync(p, bytes)
    cows.set(name, p)
  }
  return { origin: o, cows }
}

async function main(): Promise<void> {
  const kernel = prepareKernel()
  const dir = mkdtempSync(join(CACHE_DIR, 'fixtures-'))
  try {
    const origin = patternImage('origin', FIXTURE_SIZE)
    const dataPath = join(dir, 'data.img')
    const data = patternImage('data', DATA_BYTES)
    writeFileSync(dataPath, data)
    const k = files(dir, 'k', origin)
    const diskFiles = [dataPath, k.origin, ...k.cows.values()]
    const cows = new Map([...k.cows.keys()].map((name, i) => [name, diskName(i + 2)]))
    const script = kernelScript(scenario(new Random(77)), { origin: diskName(1), cows, data: diskName(0) })
    const run = await runVm(kernel, { disks: diskFiles, script })
    const errors = vmErrors(run)
    if (errors.length > 0 || run.exitCode !== 0) throw new Error(`VM errors: ${errors.join('; ')}\n${run.log.slice(-3000)}`)
    const bs = await runInBlocksnap(scenario(new Random(77)), files(dir, 'b', origin), data)
    const diffs = [...bs].filter(([key, v]) => run.results.get(key) !== v).map(([key, v]) => `${key}: kernel ${run.results.get(key)} blocksnap ${v}`)
    if (diffs.length > 0) throw new Error(`blocksnap replay differs from the kernel: ${JSON.stringify(diffs)}`)

    const out = join(process.cwd(), 'test/fixtures/kernel')
    mkdirSync(out, { recursive: true })
    writeFileSync(join(out, 'origin.img.gz'), gzipSync(readFileSync(k.origin), { level: 9 }))
    const snapshots: Record<string, unknown> = {}
    for (const [name, path] of k.cows) {
      writeFileSync(join(out, `${name}.cow.gz`), gzipSync(readFileSync(path), { level: 9 }))
      snapshots[name] = {
        cow: `${name}.cow.gz`,
        cowBytes: COWS[name],
        sha256: run.results.get(`fx.final.sha.${name}`),
        status: run.results.get(`fx.final.status.${name}`),
      }
    }
    const expected = {
      kernel: kernel.version,
      kernelPackage: kernel.packageName,
      note: 'Written by dm-snapshot in the VM (test/kernel/make-fixtures.ts). sha256 "EIO" = the kernel could not read the view (invalid snapshot).',
      sizeBytes: FIXTURE_SIZE,
      origin: { image: 'origin.img.gz', sha256: run.results.get('fx.final.sha.o') },
      mergeStatus: run.results.get('fx.merge.fm'),
      snapshots,
    }
    writeFileSync(join(out, 'expected.json'), JSON.stringify(expected, null, 2) + '\n')
    console.log(`fixtures written to ${out} (kernel ${kernel.version}, VM ${run.seconds.toFixed(1)} s)`)
    console.log(JSON.stringify(expected, null, 2))
  } finally {
    if (process.env.BLOCKSNAP_KEEP) console.log(`kept ${dir}`)
    else rmSync(dir, { recursive: true, force: true })
  }
}

await main()
