/**
 * Helpers for the CLI end-to-end tests: spawn the compiled CLI (dist/cli/bin.cjs, what the
 * package's `blocksnap` command runs; scripts/run-tests.sh builds it first) asynchronously (a served volume's
 * server is another process, but the tests also run qemu-io/nbdinfo concurrently), assert the
 * one-line error contract, and fingerprint files to prove a failed command changed nothing.
 */
import assert from 'node:assert/strict'
import { execFile, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { readFile, readdir } from 'node:fs/promises'
import { dirname, join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')
/** The package's `bin`: run it as `node BIN …` (process.execPath), as npm's shim does. */
export const BIN = join(REPO, 'dist', 'cli', 'bin.cjs')

export interface CliResult {
  readonly code: number
  readonly stdout: Buffer
  readonly stderr: string
}

/** Runs `blocksnap ...args`, feeding `input` (or nothing) on stdin. */
export function cli(args: readonly string[], options: { input?: Uint8Array; cwd?: string; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolveRun) => {
    const child = execFile(
      process.execPath,
      [BIN, ...args],
      {
        cwd: options.cwd ?? REPO,
        encoding: 'buffer',
        maxBuffer: 256 * 1024 * 1024,
        timeout: options.timeoutMs ?? 60_000,
        env: { ...process.env, BLOCKSNAP_LOG_LEVEL: 'warn' },
      },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0
        resolveRun({ code, stdout, stderr: stderr.toString('utf8') })
      },
    )
    child.stdin?.on('error', () => {}) // the CLI may exit before reading all of stdin
    child.stdin?.end(options.input ?? Buffer.alloc(0))
  })
}

function show(r: CliResult): string {
  return `exit ${r.code}\n--- stderr ---\n${r.stderr}\n--- stdout ---\n${r.stdout.toString('utf8').slice(0, 2000)}`
}

export interface OkOptions {
  /** Lines the command may print on stderr (progress, notes); each line must match. Default: none. */
  readonly stderr?: RegExp
}

/** What an offline `merge` (stderr not a terminal) prints as it goes: the one expected stderr of a success. */
export const MERGE_PROGRESS_LINE = /^blocksnap: merged \d+\/\d+ chunks \(\d+\.\d MiB\/s\)$/

/** The command succeeded: exit 0, and nothing on stderr but the lines `options.stderr` allows. */
export function ok(r: CliResult, what = 'command', options: OkOptions = {}): CliResult {
  assert.equal(r.code, 0, `${what} failed:\n${show(r)}`)
  const allowed = options.stderr
  if (!allowed) assert.equal(r.stderr, '', `${what} succeeded but wrote on stderr:\n${show(r)}`)
  else for (const line of r.stderr.split('\n').filter((l) => l !== '')) assert.match(line, allowed, `${what}: unexpected stderr line:\n${show(r)}`)
  return r
}

/** Runs a command that must succeed (see ok()) and returns its stdout. */
export async function cliOk(args: readonly string[], options: { input?: Uint8Array } & OkOptions = {}): Promise<Buffer> {
  const { stderr, ...runOptions } = options
  return ok(await cli(args, runOptions), `blocksnap ${args.join(' ')}`, stderr ? { stderr } : {}).stdout
}

/**
 * Exit code `code` and exactly one line `blocksnap: error [SNAP_…]: …` on stderr; no stack trace,
 * no stdout. `pattern` is matched against the whole line; errorMessage() strips the prefix.
 */
export function assertError(r: CliResult, code: number, pattern?: RegExp): string {
  assert.equal(r.code, code, `expected exit ${code}:\n${show(r)}`)
  assert.match(r.stderr, /^blocksnap: error \[(SNAP_[A-Z_]+|NBD_PROTOCOL)\]: [^\n]+\n$/, `expected one error line:\n${show(r)}`)
  assert.doesNotMatch(r.stderr, /\n\s+at |internal error|Error: /, `stack trace or raw error:\n${show(r)}`)
  assert.equal(r.stdout.length, 0, `unexpected stdout:\n${show(r)}`)
  if (pattern) assert.match(r.stderr, pattern)
  return r.stderr
}

/** The error line's stable code (`SNAP_BUSY` of `blocksnap: error [SNAP_BUSY]: …`). */
export function errorCode(stderr: string): string {
  return /^blocksnap: error \[([A-Z_]+)\]: /.exec(stderr)?.[1] ?? ''
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex')
}

/** relative path → sha256 for every file under `dir` (the lock file excluded: it holds the owner's PID while a command runs). */
export async function fingerprint(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>()
  const walk = async (d: string): Promise<void> => {
    for (const entry of await readdir(d, { withFileTypes: true })) {
      const p = join(d, entry.name)
      if (entry.isDirectory()) await walk(p)
      else if (entry.isFile() && entry.name !== 'lock') out.set(relative(dir, p), sha256(await readFile(p)))
    }
  }
  await walk(dir)
  return out
}

export async function assertUnchanged(dir: string, before: Map<string, string>, what: string): Promise<void> {
  const after = await fingerprint(dir)
  assert.deepEqual(after, before, `${what} changed files in ${dir}`)
}

/** Deterministic pseudo-random bytes (xorshift32), so a failure is reproducible. */
export function pattern(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length)
  let x = seed >>> 0 || 1
  for (let i = 0; i < length; i++) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    out[i] = x & 0xff
  }
  return out
}

/** Compares two buffers and, when they differ, names the first differing offset. */
export function assertBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length ${actual.length}, expected ${expected.length}`)
  if (Buffer.compare(Buffer.from(actual), Buffer.from(expected)) === 0) return
  let i = 0
  while (actual[i] === expected[i]) i++
  assert.fail(`${what}: first difference at byte ${i} (got 0x${actual[i]?.toString(16)}, expected 0x${expected[i]?.toString(16)})`)
}

export interface SnapshotJson {
  name: string
  createdAt: string | null
  chunkSizeBytes: number
  store: string
  overflow: boolean
  cowPath: string
  cowExternal: boolean
  cowSizeBytes: number
  allocatedBytes: number
  metadataBytes: number
  cowCapacityBytes: number
  dataPercent: number
  originPercent: number
  state: string
  reason: string | null
}

export interface ListJson {
  version: 1
  name: string
  path: string
  sizeBytes: number
  originPath: string
  originExternal: boolean
  snapshots: SnapshotJson[]
  merge: null | { snapshot: string; doneChunks: number; totalChunks: number }
}

const VOLUME_KEYS = ['version', 'name', 'path', 'sizeBytes', 'originPath', 'originExternal', 'snapshots', 'merge']
const SNAPSHOT_KEYS = [
  'name',
  'createdAt',
  'chunkSizeBytes',
  'store',
  'overflow',
  'cowPath',
  'cowExternal',
  'cowSizeBytes',
  'allocatedBytes',
  'metadataBytes',
  'cowCapacityBytes',
  'dataPercent',
  'originPercent',
  'state',
  'reason',
  'warnAtPercent',
  'autoextend',
]
const STATES = ['active', 'invalid', 'overflow', 'merging', 'merge-failed', 'broken']

/** Parses `list --json` output and checks it has exactly the documented shape. */
export function parseList(stdout: Buffer): ListJson {
  const v = JSON.parse(stdout.toString('utf8')) as Record<string, unknown>
  assert.deepEqual(Object.keys(v).sort(), [...VOLUME_KEYS].sort(), 'list --json volume keys')
  assert.equal(v.version, 1, 'list --json version')
  assert.equal(typeof v.name, 'string')
  assert.ok(typeof v.path === 'string' && v.path.startsWith('/'), `path is absolute: ${String(v.path)}`)
  // A path is absolute; an origin used in place may also be a device URI (nbd+unix://…).
  assert.ok(typeof v.originPath === 'string' && (v.originPath.startsWith('/') || /^[a-z+]+:/.test(v.originPath)), `originPath is absolute or a URI: ${String(v.originPath)}`)
  assert.equal(typeof v.originExternal, 'boolean')
  assert.ok(Number.isSafeInteger(v.sizeBytes))
  assert.ok(Array.isArray(v.snapshots))
  for (const s of v.snapshots as Record<string, unknown>[]) {
    assert.deepEqual(Object.keys(s).sort(), [...SNAPSHOT_KEYS].sort(), 'list --json snapshot keys')
    assert.equal(typeof s.name, 'string')
    assert.ok(typeof s.createdAt === 'string' && !Number.isNaN(Date.parse(s.createdAt)), `createdAt ${String(s.createdAt)}`)
    assert.ok(s.store === 'persistent' || s.store === 'transient', `store ${String(s.store)}`)
    assert.equal(typeof s.overflow, 'boolean')
    assert.ok(typeof s.cowPath === 'string' && (s.cowPath.startsWith('/') || /^[a-z+]+:/.test(s.cowPath)), `cowPath is absolute or a URI: ${String(s.cowPath)}`)
    assert.equal(typeof s.cowExternal, 'boolean')
    for (const k of ['chunkSizeBytes', 'cowSizeBytes', 'allocatedBytes', 'metadataBytes', 'cowCapacityBytes']) {
      assert.ok(Number.isSafeInteger(s[k]) && (s[k] as number) >= 0, `${k} = ${String(s[k])}`)
    }
    for (const k of ['dataPercent', 'originPercent']) {
      assert.ok(typeof s[k] === 'number' && (s[k] as number) >= 0 && (s[k] as number) <= 100, `${k} = ${String(s[k])}`)
    }
    assert.ok(STATES.includes(s.state as string), `state ${String(s.state)}`)
    assert.ok(s.warnAtPercent === null || (Number.isSafeInteger(s.warnAtPercent) && (s.warnAtPercent as number) >= 1 && (s.warnAtPercent as number) <= 99), `warnAtPercent ${String(s.warnAtPercent)}`)
    const auto = s.autoextend as { thresholdPercent?: unknown; percent?: unknown } | null
    assert.ok(auto === null || (Number.isSafeInteger(auto.thresholdPercent) && Number.isSafeInteger(auto.percent) && Object.keys(auto).length === 2), `autoextend ${JSON.stringify(auto)}`)
    // A reason exactly when the snapshot is broken.
    assert.ok(s.state === 'broken' ? typeof s.reason === 'string' && s.reason !== '' : s.reason === null, `reason ${String(s.reason)} for state ${String(s.state)}`)
  }
  if (v.merge !== null) {
    const m = v.merge as Record<string, unknown>
    assert.deepEqual(Object.keys(m).sort(), ['doneChunks', 'snapshot', 'totalChunks'])
  }
  return v as unknown as ListJson
}

/**
 * The kernel's status numbers for a persistent snapshot holding `exceptions` exceptions:
 * allocated = next_free * chunk (the header chunk, the metadata areas written so far and the data
 * chunks, skipping a new metadata area every exceptions-per-area data chunks); metadata =
 * (current_area + 2) * chunk.
 */
export function persistentStatus(chunkBytes: number, exceptions: number): { allocated: number; metadata: number } {
  const chunkSectors = chunkBytes / 512
  const perArea = chunkBytes / 16
  // The area holding the last exception; a full area is followed by the next one being written.
  const currentArea = Math.floor(exceptions / perArea)
  const nextFree = 1 + (currentArea + 1) + exceptions
  return { allocated: nextFree * chunkSectors, metadata: (currentArea + 2) * chunkSectors }
}

/** True when nobody holds the volume's lock (a flock on VOL/lock; the file itself stays). */
export function volumeLockFree(vol: string): boolean {
  const probe = spawnSync('flock', ['--nonblock', '--conflict-exit-code', '75', join(vol, 'lock'), 'true'])
  if (probe.status !== 0 && probe.status !== 75) throw new Error(`flock probe failed: ${probe.stderr?.toString() ?? probe.error}`)
  return probe.status === 0
}
