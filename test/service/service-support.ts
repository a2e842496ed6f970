/**
 * Shared by the `serve --metrics` tests: a served volume with a fixed-size and a grow-on-demand
 * snapshot, the metrics listener's address read from the server's log, a Prometheus text
 * parser, and an nbdsh client that stays connected until told to go.
 */
import assert from 'node:assert/strict'
import { type ChildProcess, spawn } from 'node:child_process'
import { delimiter } from 'node:path'
import { Volume } from '../../src/volume/volume.js'
import { freePort } from '../support/free-port.js'
import { ServeProcess } from '../support/serve-process.js'

export const CHUNK_BYTES = 4096
export const FIXED_COW_BYTES = 1024 * 1024
export const VOLUME_BYTES = 8 * 1024 * 1024

/**
 * A volume `dir` with snapshots `fixed` (1 MiB COW) and `grow` (grows on demand), and any
 * `more` (grow on demand), 4 KiB chunks.
 */
export async function makeVolume(dir: string, more: readonly string[] = []): Promise<void> {
  await Volume.create(dir, { sizeBytes: VOLUME_BYTES })
  const volume = await Volume.open(dir)
  try {
    await volume.createSnapshot('fixed', { chunkSizeBytes: CHUNK_BYTES, cowSizeBytes: FIXED_COW_BYTES })
    await volume.createSnapshot('grow', { chunkSizeBytes: CHUNK_BYTES })
    for (const name of more) await volume.createSnapshot(name, { chunkSizeBytes: CHUNK_BYTES })
  } finally {
    await volume.close()
  }
}

export interface Served {
  readonly serve: ServeProcess
  readonly nbdPort: number
  /** http://127.0.0.1:PORT (no trailing slash). */
  readonly base: string
}

/** `serve dir --metrics 127.0.0.1:0 …`; the bound metrics port is read from the log. */
export async function serveWithMetrics(dir: string, extra: readonly string[] = []): Promise<Served> {
  const nbdPort = await freePort()
  const serve = await ServeProcess.start([dir, '--listen', `127.0.0.1:${nbdPort}`, '--metrics', '127.0.0.1:0', ...extra])
  const m = /status page on (http:\/\/127\.0\.0\.1:\d+)\/, Prometheus metrics on http:\/\/127\.0\.0\.1:\d+\/metrics/.exec(serve.log)
  assert.ok(m, `no metrics address in the log:\n${serve.log}`)
  return { serve, nbdPort, base: m[1] as string }
}

/** SIGTERM and wait for a clean exit (0). */
export async function stopServe(served: Served | null): Promise<void> {
  if (!served || !served.serve.alive()) return
  served.serve.child.kill('SIGTERM')
  const exit = await served.serve.exit
  assert.deepEqual(exit, { code: 0, signal: null }, `serve did not stop cleanly:\n${served.serve.log}`)
}

export interface Sample {
  readonly name: string
  readonly labels: Readonly<Record<string, string>>
  readonly value: number
}

export interface Exposition {
  readonly samples: readonly Sample[]
  /** `# TYPE` of each family. */
  readonly types: ReadonlyMap<string, string>
  readonly helps: ReadonlyMap<string, string>
}

/** Parses the Prometheus text format (0.0.4) as prom-client writes it. */
export function parseExposition(text: string): Exposition {
  const samples: Sample[] = []
  const types = new Map<string, string>()
  const helps = new Map<string, string>()
  for (const line of text.split('\n')) {
    if (line === '') continue
    const meta = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line)
    if (meta) {
      ;(meta[1] === 'TYPE' ? types : helps).set(meta[2] as string, meta[3] as string)
      continue
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line)
    assert.ok(m, `not an exposition line: ${line}`)
    const labels: Record<string, string> = {}
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1] as string] = (l[2] as string).replace(/\\(.)/g, '$1')
    const raw = m[3] as string
    samples.push({ name: m[1] as string, labels, value: raw === '+Inf' ? Infinity : raw === '-Inf' ? -Infinity : Number(raw) })
  }
  return { samples, types, helps }
}

/** The samples named `name` whose labels include `labels`. */
export function select(e: Exposition, name: string, labels: Record<string, string> = {}): Sample[] {
  return e.samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
}

/** The one sample named `name` with exactly these labels' values (other labels allowed). */
export function value(e: Exposition, name: string, labels: Record<string, string>): number {
  const found = select(e, name, labels)
  assert.equal(found.length, 1, `${name}${JSON.stringify(labels)}: ${found.length} samples`)
  return (found[0] as Sample).value
}

export async function scrape(base: string): Promise<Exposition> {
  const res = await fetch(`${base}/metrics`)
  assert.equal(res.status, 200)
  assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/)
  return parseExposition(await res.text())
}

export async function statusJson(base: string): Promise<any> {
  const res = await fetch(`${base}/status.json`)
  assert.equal(res.status, 200)
  return res.json()
}

/** Polls `read` until `done` holds (a condition on the server, not a guess at timing); fails after `timeoutMs`. */
export async function until<T>(read: () => Promise<T>, done: (x: T) => boolean, what: string, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const x = await read()
    if (done(x)) return x
    if (Date.now() > deadline) assert.fail(`${what}: not reached in ${timeoutMs} ms; last: ${JSON.stringify(x).slice(0, 2000)}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

/** Debian's python3 (with the nbd module) first, as test/support/nbd-tools.ts does. */
const TOOL_ENV = { ...process.env, PATH: `/usr/bin${delimiter}${process.env.PATH ?? ''}`, LIBNBD_DEBUG: '0' }

/**
 * An nbdsh client that runs `script` on a connection to `uri`, prints READY, and stays connected
 * until release() (which closes its stdin); resolves once READY is printed.
 */
export async function holdingClient(uri: string, script: string): Promise<{ release: () => Promise<void>; child: ChildProcess }> {
  const code = `${script}\nimport sys\nprint("READY", flush=True)\nsys.stdin.read()\nh.shutdown()\n`
  const child = spawn('nbdsh', ['-u', uri, '-c', code], { env: TOOL_ENV, stdio: ['pipe', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  child.stderr.on('data', (d: Buffer) => (err += d.toString()))
  const exited = new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)))
  await new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString()
      if (out.includes('READY')) resolve()
    })
    void exited.then((c) => reject(new Error(`nbdsh exited ${c} before READY:\n${err}`)))
  })
  return {
    child,
    release: async () => {
      child.stdin.end()
      const c = await exited
      assert.equal(c, 0, `nbdsh failed:\n${err}`)
    },
  }
}
