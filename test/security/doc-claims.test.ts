/**
 * docs/security.md names, for each claim, the test that shows it: (test: `FILE` › `TITLE`). This
 * checks that every named file exists and holds a test (test/it/describe) with exactly that
 * title, and that every section names at least one, so the page cannot drift from the tests.
 */
import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { test } from 'node:test'
import { REPO } from '../cli/helpers.js'

const DOC = join(REPO, 'docs', 'security.md')
const REFERENCE = /\(test: `([^`]+)` › `([^`]+)`\)/g

interface Reference {
  readonly file: string
  readonly title: string
  readonly section: string
}

function references(markdown: string): { refs: Reference[]; sections: string[] } {
  const refs: Reference[] = []
  const sections: string[] = []
  let section = '(top)'
  for (const line of markdown.split('\n')) {
    if (line.startsWith('## ')) {
      section = line.slice(3)
      sections.push(section)
    }
    for (const match of line.matchAll(REFERENCE)) refs.push({ file: match[1]!, title: match[2]!, section })
  }
  return { refs, sections }
}

/** True when `source` declares a test, it or describe titled exactly `title`. */
function declaresTest(source: string, title: string): boolean {
  // Titles are string literals: undo the escapes a quote inside one needs; comment lines do not count.
  const text = source
    .split('\n')
    .filter((line) => !/^\s*(\/\/|\*|\/\*)/.test(line))
    .join('\n')
    .replace(/\\(['"`])/g, '$1')
  for (let at = text.indexOf(title); at !== -1; at = text.indexOf(title, at + 1)) {
    const before = text.slice(Math.max(0, at - 40), at)
    const quote = text[at - 1]
    if (quote !== undefined && `'"\``.includes(quote) && text[at + title.length] === quote && /\b(test|it|describe)\(\s*['"`]$/.test(before)) return true
  }
  return false
}

test('every test docs/security.md names exists, with that title, and every section names one', async () => {
  const { refs, sections } = references(await readFile(DOC, 'utf8'))
  assert.ok(refs.length >= 40, `only ${refs.length} references found: has the reference syntax changed?`)
  const missing: string[] = []
  const sources = new Map<string, string | null>()
  for (const ref of refs) {
    assert.match(ref.file, /^test\/.+\.test\.ts$/, `${ref.file} is not a test file`)
    if (!sources.has(ref.file)) sources.set(ref.file, await readFile(join(REPO, ref.file), 'utf8').catch(() => null))
    const source = sources.get(ref.file)
    if (source === null || source === undefined) missing.push(`${ref.file} does not exist (named in "${ref.section}")`)
    else if (!declaresTest(source, ref.title)) missing.push(`${ref.file} has no test titled "${ref.title}" (named in "${ref.section}")`)
  }
  assert.deepEqual(missing, [])
  const cited = new Set(refs.map((r) => r.section))
  assert.deepEqual(
    sections.filter((s) => !cited.has(s) && s !== 'Not covered'),
    [],
    'sections that name no test',
  )
})

test('the reference check itself: a wrong title, a comment or a prefix of a title does not count', () => {
  const source = `// it('in a comment')\ntest('a real title', () => {})\nit("it\\'s quoted", () => {})\n`
  assert.equal(declaresTest(source, 'a real title'), true)
  assert.equal(declaresTest(source, "it's quoted"), true)
  assert.equal(declaresTest(source, 'a real'), false)
  assert.equal(declaresTest(source, 'in a comment'), false)
  assert.equal(declaresTest(source, 'missing'), false)
  const { refs } = references('## A\nx (test: `test/a.test.ts` › `one`) and (test: `test/b.test.ts` › `two (2)`)\n')
  assert.deepEqual(refs, [
    { file: 'test/a.test.ts', title: 'one', section: 'A' },
    { file: 'test/b.test.ts', title: 'two (2)', section: 'A' },
  ])
})
