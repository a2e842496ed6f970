/**
 * The public API is what src/index.ts exports, as built into dist/: these lists are the contract.
 * A change to either list here must be deliberate (and noted in the README's library section);
 * an export added or lost by accident fails this test. The test hooks the engine keeps for its
 * own tests must stay out of the published declarations.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import ts from 'typescript'
import { REPO } from '../cli/helpers.js'

/** Values (classes and functions) a program gets from `import … from 'blocksnap'`. */
const RUNTIME_EXPORTS = [
  'FileDevice',
  'MemoryDevice',
  'Merge',
  'NbdClientDevice',
  'NbdServer',
  'Origin',
  'PersistentStore',
  'RbdDevice',
  'SnapError',
  'Snapshot',
  'TransientStore',
  'Volume',
  'isSnapError',
  'keepFreedHeapMapped',
  'openDevice',
  'startMerge',
  'staticExports',
]

/** Names that exist only as types. */
const TYPE_EXPORTS = [
  'BlockDevice',
  'BlockStatusExtent',
  'ConnectionLimits',
  'CreateVolumeOptions',
  'DeviceCapabilities',
  'ExceptionStore',
  'ExportProvider',
  'FileDeviceOptions',
  'MemoryDeviceOptions',
  'MergeEvents',
  'MergeOptions',
  'MergeProgress',
  'MergeState',
  'MergeStats',
  'NbdAddress',
  'NbdClientFault',
  'NbdClientOptions',
  'NbdClientStats',
  'NbdExport',
  'NbdListenOptions',
  'NbdLogger',
  'NbdReconnectPolicy',
  'NbdServerOptions',
  'NbdTlsFiles',
  'NbdTlsOptions',
  'OpenDeviceOptions',
  'OriginOptions',
  'PersistentStoreOptions',
  'RbdDeviceOptions',
  'RefusedExport',
  'SnapErrorCode',
  'SnapErrorDetails',
  'SnapshotCreateOptions',
  'SnapshotInfo',
  'SnapshotOptions',
  'SnapshotState',
  'StoreUsage',
  'TlsMode',
  'TransientStoreOptions',
  'VolumeEvent',
  'VolumeInfo',
  'VolumeOpenOptions',
  'WriteOptions',
]

const INDEX_DTS = join(REPO, 'dist', 'index.d.ts')

/** The checker's view of dist/index.d.ts, as a consumer's compiler sees it. */
function declarations(): { checker: ts.TypeChecker; exports: Map<string, ts.Symbol> } {
  const program = ts.createProgram([INDEX_DTS], {
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    types: ['node'],
    typeRoots: [join(REPO, 'node_modules', '@types')],
    noEmit: true,
  })
  const checker = program.getTypeChecker()
  const source = program.getSourceFile(INDEX_DTS)
  assert.ok(source, `${INDEX_DTS} is missing: run npm run build`)
  const moduleSymbol = checker.getSymbolAtLocation(source)
  assert.ok(moduleSymbol, 'dist/index.d.ts is not a module')
  const diagnostics = ts.getPreEmitDiagnostics(program)
  assert.deepEqual(diagnostics.map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n')), [], 'dist/*.d.ts do not type-check')
  return { checker, exports: new Map(checker.getExportsOfModule(moduleSymbol).map((s) => [s.name, s])) }
}

test('package: the runtime exports of blocksnap are exactly the curated list', async () => {
  const api = (await import(join(REPO, 'dist', 'index.js'))) as Record<string, unknown>
  assert.deepEqual(Object.keys(api).sort(), [...RUNTIME_EXPORTS].sort())
  for (const name of RUNTIME_EXPORTS) assert.equal(typeof api[name], 'function', `${name} is a class or function`)
})

test('package: the declared exports of blocksnap are exactly the curated lists', () => {
  const { checker, exports } = declarations()
  assert.deepEqual([...exports.keys()].sort(), [...RUNTIME_EXPORTS, ...TYPE_EXPORTS].sort())
  for (const [name, symbol] of exports) {
    const target = symbol.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(symbol) : symbol
    const isValue = (target.flags & ts.SymbolFlags.Value) !== 0
    assert.equal(isValue, RUNTIME_EXPORTS.includes(name), `${name}: ${isValue ? 'a value' : 'a type only'} in dist/index.d.ts`)
  }
})

test('package: test hooks are not in the published declarations', () => {
  const { checker, exports } = declarations()
  const instanceMembers = (className: string): string[] => {
    const symbol = exports.get(className)
    assert.ok(symbol, `${className} is exported`)
    const target = checker.getAliasedSymbol(symbol)
    const instance = checker.getDeclaredTypeOfSymbol(target)
    return checker.getPropertiesOfType(instance).map((p) => p.name)
  }
  const typeMembers = (name: string): string[] => {
    const symbol = exports.get(name)
    assert.ok(symbol, `${name} is exported`)
    return checker.getPropertiesOfType(checker.getDeclaredTypeOfSymbol(checker.getAliasedSymbol(symbol))).map((p) => p.name)
  }
  // The checks look at members that are there too, so a broken lookup cannot pass them.
  const snapshot = instanceMembers('Snapshot')
  assert.ok(snapshot.includes('statusText'), snapshot.join(' '))
  assert.ok(!snapshot.includes('table'), 'Snapshot.table is published')
  const origin = instanceMembers('Origin')
  assert.ok(origin.includes('addSnapshot'), origin.join(' '))
  assert.ok(!origin.includes('interceptor'), 'Origin.interceptor is published')
  const merge = instanceMembers('Merge')
  assert.ok(merge.includes('done'), merge.join(' '))
  assert.ok(!merge.includes('run'), 'Merge.run is published')
  const options = typeMembers('MergeOptions')
  assert.ok(options.includes('rateBytesPerSecond'), options.join(' '))
  assert.ok(!options.includes('unsafeSkipRelocation'), 'MergeOptions.unsafeSkipRelocation is published')
})
