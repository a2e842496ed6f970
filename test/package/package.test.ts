/**
 * blocksnap as a user gets it: `npm pack` of this checkout, `npm install --omit=dev` of the
 * tarball into an empty project, then the installed `blocksnap` command, the library imported as
 * 'blocksnap' from plain Node ESM, and its types from a consumer's tsc. Nothing of the checkout
 * (tsx, sources, node_modules) is reachable from the temp project, so a file missing from the
 * tarball or a run-time need for a devDependency fails here.
 *
 * The pack reuses the dist/ that scripts/run-tests.sh built (--ignore-scripts skips the prepare
 * build) after checking that dist/ is the build of the current src/.
 */
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { mkdir, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { MERGE_PROGRESS_LINE, REPO, assertBytes, parseList, pattern } from '../cli/helpers.js'

interface Run {
  readonly code: number
  readonly stdout: Buffer
  readonly stderr: string
}

/** The environment of a user's shell: npm's own variables (set when this runs under `npm test`) would point npm at the checkout. */
function userEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {}
  for (const [k, v] of Object.entries(process.env)) if (!/^npm_/i.test(k) && k !== 'INIT_CWD') env[k] = v
  return { ...env, BLOCKSNAP_LOG_LEVEL: 'warn' }
}

function run(cmd: string, args: readonly string[], cwd: string, input?: Uint8Array): Promise<Run> {
  return new Promise((resolveRun) => {
    const child = execFile(cmd, args, { cwd, env: userEnv(), encoding: 'buffer', maxBuffer: 64 * 1024 * 1024, timeout: 120_000 }, (error, stdout, stderr) => {
      resolveRun({ code: error ? (typeof error.code === 'number' ? error.code : -1) : 0, stdout, stderr: stderr.toString('utf8') })
    })
    child.stdin?.on('error', () => {})
    child.stdin?.end(input ?? Buffer.alloc(0))
  })
}

async function runOk(cmd: string, args: readonly string[], cwd: string, options: { input?: Uint8Array; stderr?: RegExp } = {}): Promise<Buffer> {
  const r = await run(cmd, args, cwd, options.input)
  const shown = `${cmd} ${args.join(' ')}: exit ${r.code}\n--- stderr ---\n${r.stderr}\n--- stdout ---\n${r.stdout.toString('utf8').slice(0, 4000)}`
  assert.equal(r.code, 0, shown)
  if (options.stderr) for (const line of r.stderr.split('\n').filter((l) => l !== '')) assert.match(line, options.stderr, shown)
  return r.stdout
}

/** Every path under `dir` (files and folders), relative to it. */
async function filesUnder(dir: string): Promise<string[]> {
  return readdir(dir, { recursive: true })
}

/** dist/ is the build of src/ as it is now: every module built after its source, nothing left over from deleted ones. */
async function assertDistFresh(): Promise<void> {
  const src = join(REPO, 'src')
  const dist = join(REPO, 'dist')
  const hint = 'run `npm run build` (scripts/run-tests.sh does)'
  const sources = (await filesUnder(src)).filter((f) => /\.c?ts$/.test(f))
  const built = new Set((await filesUnder(dist).catch(() => [])).filter((f) => /\.c?js$/.test(f)))
  assert.ok(built.size > 0, `dist/ is missing: ${hint}`)
  const expected = new Set<string>()
  for (const f of sources) {
    const js = f.replace(/\.ts$/, '.js').replace(/\.cts$/, '.cjs')
    expected.add(js)
    assert.ok(built.has(js), `dist/${js} is missing: ${hint}`)
    const [s, d] = await Promise.all([stat(join(src, f)), stat(join(dist, js))])
    assert.ok(d.mtimeMs >= s.mtimeMs, `dist/${js} is older than src/${f}: ${hint}`)
  }
  const leftovers = [...built].filter((f) => !expected.has(f))
  assert.deepEqual(leftovers, [], `dist/ holds modules without a source: ${hint}`)
}

/** A consumer's first program: the engine in memory, a volume the CLI made, and an error code. */
const CONSUMER_MJS = `
import { MemoryDevice, Origin, Snapshot, SnapError, TransientStore, Volume, isSnapError } from 'blocksnap'

const origin = new Origin(new MemoryDevice(1 << 20))
const snap = new Snapshot({ name: 's', store: new TransientStore(new MemoryDevice(1 << 20), { chunkBytes: 4096, growable: true }) })
await origin.addSnapshot(snap)
await origin.write(new Uint8Array(8192).fill(7), 4096)
await origin.flush()
const snapOld = Buffer.from(await snap.read(4096, 8192))
const originNow = Buffer.from(await origin.read(4096, 8192))
const status = snap.statusText()
await origin.close()

const volume = await Volume.open(process.argv[2])
const info = await volume.info()
await volume.close()

let missing = null
try {
  await Volume.open(process.argv[2] + '-missing')
} catch (err) {
  missing = { snapError: err instanceof SnapError, code: isSnapError(err) ? err.code : String(err) }
}
console.log(JSON.stringify({
  snapOldZero: snapOld.every((b) => b === 0),
  originNowSevens: originNow.every((b) => b === 7),
  status,
  volume: { name: info.name, sizeBytes: info.sizeBytes, snapshots: info.snapshots.map((s) => s.name) },
  missing,
}))
`

/** A consumer's TypeScript: the types resolve, and the engine's test hooks are not among them. */
const CONSUMER_TS = `
import {
  MemoryDevice, Origin, Snapshot, TransientStore, Volume, startMerge,
  type BlockDevice, type MergeProgress, type SnapErrorCode, type VolumeInfo,
} from 'blocksnap'

const device: BlockDevice = new MemoryDevice(1 << 20)
const origin = new Origin(device)
const snap = new Snapshot({ name: 's', store: new TransientStore(new MemoryDevice(1 << 20), { chunkBytes: 4096 }) })
export const code: SnapErrorCode = 'SNAP_BUSY'
export async function info(path: string): Promise<VolumeInfo> {
  const volume = await Volume.open(path)
  try {
    return await volume.info()
  } finally {
    await volume.close()
  }
}
export const done = (p: MergeProgress): number => p.doneChunks / p.totalChunks
export async function roll(): Promise<void> {
  const merge = await startMerge(origin, snap, { rateBytesPerSecond: 24 * 1024 * 1024 })
  await merge.done
}
// A wrong code must not type-check, or this file would prove nothing about the types.
// @ts-expect-error
export const wrong: SnapErrorCode = 'SNAP_NO_SUCH_CODE'
// @ts-expect-error test hooks are not part of the published types
export const table = snap.table
// @ts-expect-error
export const interceptor = origin.interceptor
// @ts-expect-error
export const skip = () => startMerge(origin, snap, { unsafeSkipRelocation: true })
`

describe('package: npm pack, install --omit=dev, use', { concurrency: false }, () => {
  let tmp = ''
  let project = ''
  let tarball = ''
  let blocksnap = ''
  const version = (JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as { version: string }).version

  before(async () => {
    await assertDistFresh()
    tmp = await mkdtemp(join(tmpdir(), 'blocksnap-package-'))
    const packed = JSON.parse((await runOk('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', tmp], REPO)).toString('utf8')) as Array<{
      filename: string
      entryCount: number
      size: number
    }>
    const info = packed[0]
    assert.ok(info, 'npm pack --json printed nothing')
    tarball = join(tmp, info.filename)
    console.log(`tarball ${info.filename}: ${info.entryCount} files, ${info.size} bytes`)
    project = join(tmp, 'consumer')
    await mkdir(project)
    await writeFile(join(project, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', private: true, type: 'module' }))
    // The registry is reachable, but `npm ci` left the dependencies in npm's cache.
    await runOk('npm', ['install', '--omit=dev', '--prefer-offline', '--no-audit', '--no-fund', tarball], project, {
      stderr: /^npm warn /,
    })
    blocksnap = join(project, 'node_modules', '.bin', 'blocksnap')
  })

  after(async () => {
    if (tmp) await rm(tmp, { recursive: true, force: true })
  })

  test('the tarball holds the build, docs, the systemd units, README and LICENSE, and no tests, benchmarks, fixtures, sources or CI files', async () => {
    const entries = (await runOk('tar', ['tzf', tarball], tmp)).toString('utf8').split('\n').filter((l) => l !== '' && !l.endsWith('/'))
    for (const needed of ['package.json', 'README.md', 'LICENSE', 'dist/index.js', 'dist/index.d.ts', 'dist/cli/bin.cjs', 'dist/cli/main.js', 'contrib/systemd/blocksnap@.service', 'contrib/systemd/blocksnap@.socket']) {
      assert.ok(entries.includes(`package/${needed}`), `${needed} missing from the tarball`)
    }
    const allowed = /^package\/(package\.json|README\.md|LICENSE|docs\/[^/]+\.md|contrib\/systemd\/blocksnap@\.(service|socket)|dist\/.+\.(c?js|d\.c?ts|c?js\.map))$/
    assert.deepEqual(entries.filter((e) => !allowed.test(e)), [], 'unexpected files in the tarball')
    for (const banned of [/\btest\//, /\bbench\//, /fixtures/, /\.ci\//, /\bscripts\//, /^package\/src\//, /\.test\./, /tsconfig/, /BENCHMARKS/, /\.github/]) {
      assert.deepEqual(entries.filter((e) => banned.test(e)), [], `tarball entries matching ${banned}`)
    }
  })

  test('the installed blocksnap command works without devDependencies', async () => {
    // No tsx, no typescript: only the package and its runtime dependencies.
    const installed = await readdir(join(project, 'node_modules'))
    for (const dev of ['tsx', 'typescript', '@types']) assert.ok(!installed.includes(dev), `${dev} installed`)
    assert.equal((await runOk(blocksnap, ['--version'], project)).toString('utf8').trim(), version)

    const vol = join(tmp, 'vol')
    const data = pattern(100_000, 16)
    const input = join(tmp, 'data.bin')
    await writeFile(input, data)
    await runOk(blocksnap, ['create', vol, '--size', '4M'], project)
    await runOk(blocksnap, ['snapshot', `${vol}@before`, '--chunk-size', '64K', '--cow-size', '2M'], project)
    await runOk(blocksnap, ['write', vol, '--offset', '64K', '--input', input], project)
    const range = ['--offset', '64K', '--length', String(data.length)]
    assertBytes(await runOk(blocksnap, ['read', `${vol}@before`, ...range], project), Buffer.alloc(data.length), 'snapshot before the write')
    assertBytes(await runOk(blocksnap, ['read', vol, ...range], project), data, 'origin after the write')

    const listed = parseList(await runOk(blocksnap, ['list', vol, '--json'], project))
    assert.equal(listed.sizeBytes, 4 * 1024 * 1024)
    assert.deepEqual(
      listed.snapshots.map((s) => [s.name, s.chunkSizeBytes, s.cowSizeBytes, s.state]),
      [['before', 64 * 1024, 2 * 1024 * 1024, 'active']],
    )

    await runOk(blocksnap, ['merge', `${vol}@before`, '--rate', '24M'], project, { stderr: MERGE_PROGRESS_LINE })
    assertBytes(await runOk(blocksnap, ['read', vol, ...range], project), Buffer.alloc(data.length), 'origin after merging the snapshot back')
    assert.deepEqual(parseList(await runOk(blocksnap, ['list', vol, '--json'], project)).snapshots, [])
  })

  test("import … from 'blocksnap' works from plain Node ESM", async () => {
    const vol = join(tmp, 'lib-vol')
    await runOk(blocksnap, ['create', vol, '--size', '1M'], project)
    await runOk(blocksnap, ['snapshot', `${vol}@one`], project)
    await writeFile(join(project, 'consumer.mjs'), CONSUMER_MJS)
    const { status, ...out } = JSON.parse((await runOk(process.execPath, ['consumer.mjs', vol], project)).toString('utf8')) as Record<string, unknown>
    assert.deepEqual(out, {
      snapOldZero: true,
      originNowSevens: true,
      volume: { name: 'lib-vol', sizeBytes: 1024 * 1024, snapshots: ['one'] },
      missing: { snapError: true, code: 'SNAP_NOT_FOUND' },
    })
    // A transient snapshot's dmsetup status: two 4K chunks copied, in sectors, of a 1 MiB COW.
    assert.equal(status, '16/2048 0')
  })

  test("the types resolve for a TypeScript consumer, without the engine's test hooks", async () => {
    await writeFile(join(project, 'consumer.ts'), CONSUMER_TS)
    await writeFile(
      join(project, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          module: 'NodeNext',
          moduleResolution: 'NodeNext',
          target: 'ES2022',
          strict: true,
          noEmit: true,
          // dist's declarations are type-checked by api-surface.test.ts; checking @types/node again costs seconds.
          skipLibCheck: true,
          // A consumer of a Node library brings @types/node; this one borrows the checkout's.
          types: ['node'],
          typeRoots: [join(REPO, 'node_modules', '@types')],
        },
        files: ['consumer.ts'],
      }),
    )
    await runOk(process.execPath, [join(REPO, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], project)
  })
})
