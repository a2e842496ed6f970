/**
 * `blocksnap completion bash|zsh` (issue 16, item 3): scripts generated from the command tree.
 * The bash script is sourced in a real bash and driven as readline drives it (COMP_WORDS,
 * COMP_CWORD, then the function `complete -p` names); what it offers is compared with what
 * `--help` documents, so a command or option the CLI gains is checked too. Also: every command's
 * --help ends with examples.
 */
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { assertError, cli, cliOk } from './helpers.js'

let T = ''
let script = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-completion-'))
})

after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

/** What bash offers for the command line `words` (the last word is the one being completed). */
function complete(...lines: string[][]): string[][] {
  const calls = lines.map((words) => {
    const quoted = words.map((w) => `'${w.replace(/'/g, `'\\''`)}'`).join(' ')
    return `COMP_WORDS=(${quoted}); COMP_CWORD=${words.length - 1}; COMPREPLY=(); "$fn" blocksnap; printf '%s\\n' "\${COMPREPLY[*]}"`
  })
  // The function is the one the script registered for `blocksnap`, as readline would find it.
  const program = `set -u; source '${script}'; fn=$(complete -p blocksnap | sed -E 's/.*-F ([^ ]+).*/\\1/'); cd '${T}'; ${calls.join('; ')}`
  const r = spawnSync('bash', ['--norc', '--noprofile', '-c', program], { encoding: 'utf8' })
  assert.equal(r.status, 0, `bash: ${r.stderr}`)
  assert.equal(r.stderr, '', 'no errors from the script')
  return r.stdout.split('\n').slice(0, lines.length).map((l) => (l === '' ? [] : l.split(' ')))
}

/** Command names and `--long` options from commander's help text. */
function helpCommands(help: string): string[] {
  const section = help.split('\nCommands:\n')[1] ?? ''
  return [...section.split('\n\n')[0]!.matchAll(/^ {2}(\S+)/gm)].map((m) => m[1]!)
}

function helpOptions(help: string): string[] {
  const section = help.split('\nOptions:\n')[1]?.split('\n\n')[0] ?? ''
  return [...section.matchAll(/^ {2}(?:-\w, )?(--[\w-]+)/gm)].map((m) => m[1]!)
}

describe('completion', { concurrency: 1 }, () => {
  before(async () => {
    script = join(T, 'blocksnap.bash')
    await writeFile(script, await cliOk(['completion', 'bash']))
  })

  it('bash: sn<TAB> is snapshot, snapshot --st<TAB> is --store, then its choices', () => {
    const [commands, option, choices, afterEquals, shells, helpTopics] = complete(
      ['blocksnap', 'sn'],
      ['blocksnap', 'snapshot', '--st'],
      ['blocksnap', 'snapshot', 'vm@s', '--store', ''],
      ['blocksnap', 'snapshot', '--store', '=', 'tr'],
      ['blocksnap', 'completion', ''],
      ['blocksnap', 'help', 'm'],
    )
    assert.deepEqual(commands, ['snapshot'])
    assert.deepEqual(option, ['--store'])
    assert.deepEqual(choices, ['persistent', 'transient'])
    assert.deepEqual(afterEquals, ['transient'])
    assert.deepEqual(shells, ['bash', 'zsh'])
    assert.deepEqual([...helpTopics!].sort(), ['map', 'merge'])
  })

  it('bash: every command and every option --help documents is offered; values complete sensibly', async () => {
    const help = (await cliOk(['--help'])).toString()
    const commands = helpCommands(help)
    assert.ok(commands.includes('snapshot') && commands.includes('completion') && commands.includes('help'), commands.join(' '))
    const [offered] = complete(['blocksnap', ''])
    assert.deepEqual([...offered!].sort(), [...commands].sort(), 'commands')

    const named = commands.filter((c) => c !== 'help')
    const helps = await Promise.all(named.map(async (c) => (await cliOk([c, '--help'])).toString()))
    const offers = complete(...named.map((c) => ['blocksnap', c, '--']))
    named.forEach((c, i) => {
      const documented = helpOptions(helps[i]!)
      assert.ok(documented.includes('--help'), `${c} --help lists options`)
      assert.deepEqual(offers[i]!.filter((w) => w.startsWith('--')).sort(), documented.sort(), `${c}: options offered`)
    })

    // A size completes to nothing; a FILE to file names; a positional VOL to file names.
    await writeFile(join(T, 'disk.img'), '')
    const [size, image, volume] = complete(['blocksnap', 'create', 'vm', '--size', ''], ['blocksnap', 'create', 'vm', '--from', 'dis'], ['blocksnap', 'list', 'dis'])
    assert.deepEqual(size, [])
    assert.deepEqual(image, ['disk.img'])
    assert.deepEqual(volume, ['disk.img'])
  })

  it('zsh: a #compdef script with every command, its options and choices', async () => {
    const zsh = (await cliOk(['completion', 'zsh'])).toString()
    assert.match(zsh, /^#compdef blocksnap\n/)
    const commands = helpCommands((await cliOk(['--help'])).toString())
    for (const c of commands) {
      assert.match(zsh, new RegExp(`^    '${c}:`, 'm'), `${c} is described`)
      assert.match(zsh, new RegExp(`^    ${c}\\)$`, 'm'), `${c} has its case`)
    }
    assert.match(zsh, /'--store\[exception store\]:STORE:\(persistent transient\)'/)
    assert.match(zsh, /'--from\[copy this image as the origin\]:IMAGE:_files'/)
    assert.match(zsh, /':SHELL:\(bash zsh\)'/)
    // A single quote in a description is closed, escaped and reopened ('\''): the rest balances.
    for (const line of zsh.split('\n').filter((l) => !l.trimStart().startsWith('#'))) assert.equal((line.replace(/'\\''/g, '').match(/'/g) ?? []).length % 2, 0, `quotes balance: ${line}`)
    const hasZsh = spawnSync('zsh', ['--version']).status === 0
    if (hasZsh) {
      const r = spawnSync('zsh', ['-n'], { input: zsh, encoding: 'utf8' })
      assert.equal(r.status, 0, `zsh -n: ${r.stderr}`)
    }
  })

  it('completion refuses another shell as a usage error', async () => {
    assertError(await cli(['completion', 'fish']), 2, /^blocksnap: error \[SNAP_USAGE\]: .*'fish' is invalid .*bash, zsh/)
  })
})

describe('help', () => {
  it('--help of the program and of every command ends with examples of that command', async () => {
    const root = (await cliOk(['--help'])).toString()
    const commands = helpCommands(root).filter((c) => c !== 'help')
    const texts = await Promise.all(commands.map(async (c) => [c, (await cliOk([c, '--help'])).toString()] as const))
    for (const [c, text] of [['blocksnap', root] as const, ...texts]) {
      const section = text.split('\nExamples:\n')[1]
      assert.ok(section !== undefined, `${c} --help has an Examples: section:\n${text}`)
      const lines = section.trimEnd().split('\n')
      assert.ok(lines.length >= 1)
      for (const line of lines) assert.match(line, /^ {2}(\S.*[\s(])?blocksnap /, `${c}: example line ${line}`)
      if (c !== 'blocksnap') assert.ok(lines.every((l) => new RegExp(`blocksnap ${c}( |$)`).test(l)), `${c}: every example runs ${c}`)
    }
  })
})
