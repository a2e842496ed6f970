/**
 * Architecture check: every import inside src/ must respect the layer order
 *
 *   base (util, units, errors, log) <- protocol <- device <- format <- store <- snapshot <- merge
 *     <- volume <- backup <- nbd / control <- service (metrics, status page) <- cli, index (the package's public API)
 *
 * - a module may import only from its own layer or a lower one;
 * - protocol/ holds pure wire codecs (the NBD protocol, shared by the server in nbd/ and the
 *   client device in device/): it sits below device so a device can speak it, and imports only
 *   base and itself;
 * - nbd/ may import only base, device and nbd (it is a transport, it knows no snapshot engine);
 * - format/ never imports device/ (it is pure bytes);
 * - nothing outside cli/ imports cli/;
 * - nothing imports index (it is what the package exports, not a shortcut for src/);
 * - nothing in src/ imports test/.
 *
 * Specifiers are found with a regex over `from '...'`, `import '...'` and `import('...')`, so
 * type-only imports and re-exports count as edges too. Relative specifiers are resolved to the
 * top-level folder (or root file) under src/ they land in.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync, readdirSync, statSync } from 'node:fs'
import { dirname, join, relative, resolve, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')
const SRC = join(ROOT, 'src')

const BASE = ['util', 'units', 'errors', 'log'] as const
const RANK: Readonly<Record<string, number>> = {
  util: 0,
  units: 0,
  errors: 0,
  log: 0,
  protocol: 0.5,
  device: 1,
  format: 2,
  store: 3,
  snapshot: 4,
  merge: 5,
  volume: 6,
  backup: 7,
  nbd: 8,
  control: 8,
  service: 9,
  cli: 10,
  index: 10,
}
const NBD_MAY_IMPORT = new Set<string>([...BASE, 'protocol', 'device', 'nbd'])

export interface ImportEdge {
  /** Importing file, relative to the repository root with '/' separators. */
  readonly from: string
  /** Imported module resolved relative to the repository root, e.g. 'src/format/layout.js'. */
  readonly to: string
  readonly specifier: string
}

function posix(path: string): string {
  return path.split(sep).join('/')
}

/** Top-level module under src/ ('format', 'errors', ...), or null when the path is not in src/. */
export function topLevel(repoPath: string): string | null {
  const parts = repoPath.split('/')
  if (parts[0] !== 'src' || parts.length < 2) return null
  const first = parts[1] as string
  return parts.length === 2 ? first.replace(/\.(d\.)?[cm]?[jt]sx?$/, '') : first
}

/** Module specifiers in a TypeScript source text (comments stripped first). */
export function importSpecifiers(source: string): string[] {
  const code = source.replace(/\/\*[\s\S]*?\*\//g, '').replace(/^\s*\/\/.*$/gm, '')
  const found: string[] = []
  const pattern = /\bfrom\s*['"]([^'"\n]+)['"]|\bimport\s*\(\s*['"]([^'"\n]+)['"]\s*\)|^\s*import\s*['"]([^'"\n]+)['"]/gm
  for (const m of code.matchAll(pattern)) found.push((m[1] ?? m[2] ?? m[3]) as string)
  return found
}

/** Every relative import edge of the files under src/. */
export function collectEdges(root = ROOT): ImportEdge[] {
  const edges: ImportEdge[] = []
  const walk = (dir: string): void => {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name)
      if (statSync(path).isDirectory()) walk(path)
      else if (/\.[cm]?tsx?$/.test(name)) {
        const from = posix(relative(root, path))
        for (const specifier of importSpecifiers(readFileSync(path, 'utf8'))) {
          if (!specifier.startsWith('.')) continue // node: builtins and packages
          edges.push({ from, to: posix(relative(root, resolve(dirname(path), specifier))), specifier })
        }
      }
    }
  }
  walk(join(root, 'src'))
  return edges
}

/** One human-readable line per edge that breaks a rule; empty when the graph is clean. */
export function checkEdges(edges: readonly ImportEdge[]): string[] {
  const violations: string[] = []
  for (const edge of edges) {
    const report = (why: string) => violations.push(`${edge.from} -> '${edge.specifier}' (${edge.to}): ${why}`)
    const fromLayer = topLevel(edge.from)
    if (fromLayer === null) continue
    if (edge.to === 'test' || edge.to.startsWith('test/')) {
      report('src must not import test code')
      continue
    }
    const toLayer = topLevel(edge.to)
    if (toLayer === null) {
      report('import leaves src/')
      continue
    }
    const fromRank = RANK[fromLayer]
    const toRank = RANK[toLayer]
    if (fromRank === undefined) report(`'${fromLayer}' is not in the layer table`)
    if (toRank === undefined) report(`'${toLayer}' is not in the layer table`)
    if (fromRank === undefined || toRank === undefined) continue
    if (toLayer === 'cli' && fromLayer !== 'cli') report('nothing may import cli')
    if (toLayer === 'index') report('nothing may import index')
    if (fromLayer === 'format' && toLayer === 'device') report('format must not import device')
    if (fromLayer === 'nbd' && !NBD_MAY_IMPORT.has(toLayer)) report(`nbd may import only base, protocol, device and nbd, not ${toLayer}`)
    if (toRank > fromRank) report(`${fromLayer} (layer ${fromRank}) must not import ${toLayer} (layer ${toRank})`)
  }
  return violations
}

test('arch: importSpecifiers finds static, type-only, re-export, side-effect and dynamic imports', () => {
  const source = [
    "import { a } from '../a.js'",
    "import type { B } from '../b.js'",
    'import {',
    '  c,',
    "} from './c.js'",
    "export { d } from '../d.js'",
    "export * from '../e.js'",
    "import '../f.js'",
    "const g = await import('../g.js')",
    "type H = import('../h.js').H",
    "// import { x } from '../commented-out.js'",
    "/* from '../block-comment.js' */",
    "import { readFile } from 'node:fs/promises'",
  ].join('\n')
  assert.deepEqual(importSpecifiers(source), [
    '../a.js',
    '../b.js',
    './c.js',
    '../d.js',
    '../e.js',
    '../f.js',
    '../g.js',
    '../h.js',
    'node:fs/promises',
  ])
})

test('arch: topLevel maps folders and root files under src to their layer name', () => {
  assert.equal(topLevel('src/format/layout.js'), 'format')
  assert.equal(topLevel('src/nbd/negotiation.ts'), 'nbd')
  assert.equal(topLevel('src/protocol/nbd/reply.ts'), 'protocol')
  assert.equal(topLevel('src/errors.js'), 'errors')
  assert.equal(topLevel('src/units.ts'), 'units')
  assert.equal(topLevel('test/support/random.js'), null)
})

test('arch: the checker reports synthetic bad edges (self-test)', () => {
  const bad: ImportEdge[] = [
    { from: 'src/format/area.ts', to: 'src/device/block-device.js', specifier: '../device/block-device.js' },
    { from: 'src/nbd/server.ts', to: 'src/store/exception-store.js', specifier: '../store/exception-store.js' },
    { from: 'src/nbd/export.ts', to: 'src/volume/volume.js', specifier: '../volume/volume.js' },
    { from: 'src/store/persistent-store.ts', to: 'src/snapshot/snapshot.js', specifier: '../snapshot/snapshot.js' },
    { from: 'src/errors.ts', to: 'src/units.js', specifier: './units.js' }, // same layer: allowed
    { from: 'src/device/file-device.ts', to: 'src/format/layout.js', specifier: '../format/layout.js' },
    { from: 'src/control/control-server.ts', to: 'src/cli/main.js', specifier: '../cli/main.js' },
    { from: 'src/volume/volume.ts', to: 'test/support/random.js', specifier: '../../test/support/random.js' },
    { from: 'src/merge/merge.ts', to: 'src/mystery/thing.js', specifier: '../mystery/thing.js' },
    { from: 'src/protocol/nbd/reply.ts', to: 'src/device/block-device.js', specifier: '../../device/block-device.js' },
    { from: 'src/cli/serve.ts', to: 'src/index.js', specifier: '../index.js' },
    { from: 'src/index.ts', to: 'src/cli/main.js', specifier: './cli/main.js' },
    { from: 'src/nbd/server.ts', to: 'src/service/metrics.js', specifier: '../service/metrics.js' },
    { from: 'src/volume/volume.ts', to: 'src/service/status.js', specifier: '../service/status.js' },
    { from: 'src/service/metrics.ts', to: 'src/cli/serve.js', specifier: '../cli/serve.js' },
  ]
  const violations = checkEdges(bad)
  const offenders = new Set(violations.map((v) => v.slice(0, v.indexOf(' -> '))))
  assert.deepEqual(
    [...offenders].sort(),
    [
      'src/cli/serve.ts',
      'src/control/control-server.ts',
      'src/device/file-device.ts',
      'src/format/area.ts',
      'src/index.ts',
      'src/merge/merge.ts',
      'src/nbd/export.ts',
      'src/nbd/server.ts',
      'src/protocol/nbd/reply.ts',
      'src/service/metrics.ts',
      'src/store/persistent-store.ts',
      'src/volume/volume.ts',
    ],
  )
  assert.ok(violations.some((v) => v.startsWith('src/volume/volume.ts') && v.includes('volume (layer 6) must not import service (layer 9)')))
  assert.ok(violations.some((v) => v.startsWith('src/service/metrics.ts') && v.includes('nothing may import cli')))
  assert.ok(violations.some((v) => v.startsWith('src/format/area.ts') && v.includes('format must not import device')))
  assert.ok(violations.some((v) => v.startsWith('src/nbd/server.ts') && v.includes('nbd may import only')))
  assert.ok(violations.some((v) => v.startsWith('src/control/control-server.ts') && v.includes('nothing may import cli')))
  assert.ok(violations.some((v) => v.startsWith('src/volume/volume.ts') && v.includes('must not import test')))
  assert.ok(violations.some((v) => v.startsWith('src/cli/serve.ts') && v.includes('nothing may import index')))
  assert.ok(violations.some((v) => v.startsWith('src/index.ts') && v.includes('nothing may import cli')))
})

test('arch: the checker accepts edges that follow the layer order', () => {
  const good: ImportEdge[] = [
    { from: 'src/nbd/export.ts', to: 'src/device/block-device.js', specifier: '../device/block-device.js' },
    { from: 'src/nbd/server.ts', to: 'src/errors.js', specifier: '../errors.js' },
    { from: 'src/nbd/connection.ts', to: 'src/protocol/nbd/reply.js', specifier: '../protocol/nbd/reply.js' },
    { from: 'src/device/nbd-client-device.ts', to: 'src/protocol/nbd/request.js', specifier: '../protocol/nbd/request.js' },
    { from: 'src/cli/main.ts', to: 'src/cli/volume-exports.js', specifier: './volume-exports.js' },
    { from: 'src/cli/main.ts', to: 'src/nbd/server.js', specifier: '../nbd/server.js' },
    { from: 'src/control/volume-ops.ts', to: 'src/volume/volume.js', specifier: '../volume/volume.js' },
    { from: 'src/control/volume-ops.ts', to: 'src/nbd/export.js', specifier: '../nbd/export.js' },
    { from: 'src/store/persistent-store.ts', to: 'src/format/layout.js', specifier: '../format/layout.js' },
    { from: 'src/format/area.ts', to: 'src/errors.js', specifier: '../errors.js' },
    { from: 'src/snapshot/origin.ts', to: 'src/util/deferred.js', specifier: '../util/deferred.js' },
    { from: 'src/index.ts', to: 'src/volume/volume.js', specifier: './volume/volume.js' },
    { from: 'src/index.ts', to: 'src/nbd/server.js', specifier: './nbd/server.js' },
    { from: 'src/service/status.ts', to: 'src/volume/volume.js', specifier: '../volume/volume.js' },
    { from: 'src/service/metrics.ts', to: 'src/nbd/request-observer.js', specifier: '../nbd/request-observer.js' },
    { from: 'src/cli/serve.ts', to: 'src/service/metrics.js', specifier: '../service/metrics.js' },
  ]
  assert.deepEqual(checkEdges(good), [])
})

test('arch: src/ imports follow the layer order', () => {
  const edges = collectEdges()
  // The scan must see the graph, or an empty result would prove nothing.
  assert.ok(edges.length > 20, `only ${edges.length} import edges found under src/`)
  assert.ok(edges.some((e) => e.from === 'src/store/persistent-store.ts' && e.to === 'src/format/layout.js'))
  assert.deepEqual(checkEdges(edges), [])
})
