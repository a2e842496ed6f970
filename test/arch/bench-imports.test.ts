/**
 * The bench stands on its own: nothing under bench/ imports test code (helpers it needs live in
 * bench/lib or src/). Specifiers are found as in imports.test.ts: `from '...'`, `import '...'`
 * and `import('...')`, comments stripped, resolved against the importing file.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync, readdirSync, statSync } from 'node:fs'
import { dirname, join, relative, resolve, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')

function specifiers(source: string): string[] {
  const code = source.replace(/\/\*[\s\S]*?\*\//g, '').replace(/^\s*\/\/.*$/gm, '')
  const pattern = /\bfrom\s*['"]([^'"\n]+)['"]|\bimport\s*\(\s*['"]([^'"\n]+)['"]\s*\)|^\s*import\s*['"]([^'"\n]+)['"]/gm
  return [...code.matchAll(pattern)].map((m) => (m[1] ?? m[2] ?? m[3]) as string)
}

/** Every import of a file under `dir` that lands in test/, as 'file -> specifier'. */
function testImports(dir: string): { files: string[]; offenders: string[] } {
  const offenders: string[] = []
  const files: string[] = []
  const walk = (d: string): void => {
    for (const name of readdirSync(d)) {
      const path = join(d, name)
      if (statSync(path).isDirectory()) walk(path)
      else if (/\.[cm]?tsx?$/.test(name)) {
        files.push(relative(ROOT, path).split(sep).join('/'))
        for (const s of specifiers(readFileSync(path, 'utf8'))) {
          if (!s.startsWith('.') && !s.startsWith('/')) continue
          const target = relative(ROOT, resolve(dirname(path), s)).split(sep).join('/')
          if (target === 'test' || target.startsWith('test/')) offenders.push(`${relative(ROOT, path)} -> ${s}`)
        }
      }
    }
  }
  walk(dir)
  return { files, offenders }
}

test('arch: the checker finds an import of test code (self-test)', () => {
  const source = "import { freePort } from '../../test/support/free-port.js'\nimport { x } from '../lib/x.js'"
  assert.deepEqual(specifiers(source), ['../../test/support/free-port.js', '../lib/x.js'])
})

test('arch: bench/ does not import test/', () => {
  const { files, offenders } = testImports(join(ROOT, 'bench'))
  // The scan must see the bench, or an empty result would prove nothing.
  assert.ok(files.includes('bench/run.ts'), `bench/run.ts not among the scanned files: ${files.join(', ')}`)
  assert.deepEqual(offenders, [])
})
