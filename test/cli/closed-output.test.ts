/**
 * A reader that goes away (`blocksnap … | head -1`): commands stop quietly with the broken-pipe
 * status, 141, instead of a stack trace; `serve` keeps serving. The closed pipe is made
 * deterministically: its only reader has exited before the CLI starts, so every write fails.
 */
import assert from 'node:assert/strict'
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { closeSync, constants, openSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { promisify } from 'node:util'
import { freePort } from '../support/free-port.js'
import { BIN, cliOk } from './helpers.js'

let T = ''
before(async () => {
  T = await mkdtemp(join(tmpdir(), 'bs-closed-out-'))
})
after(() => rm(T, { recursive: true, force: true }))

let fifoCount = 0

/** The write end (a descriptor) of a pipe whose only reader is already closed: every write fails. */
function closedPipe(): number {
  const fifo = join(T, `fifo-${fifoCount++}`)
  execFileSync('mkfifo', [fifo])
  const reader = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK)
  const writer = openSync(fifo, constants.O_WRONLY)
  closeSync(reader)
  return writer
}

async function runWithClosedOutput(args: readonly string[]): Promise<{ code: number | null; stderr: string }> {
  const stdout = closedPipe()
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', stdout, 'pipe'] })
  closeSync(stdout)
  let stderr = ''
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()))
  const [code] = (await once(child, 'exit')) as [number | null]
  return { code, stderr }
}

test('closed stdout: help and a JSON listing end quietly with status 141, no stack trace', async () => {
  const vol = join(T, 'vol')
  await cliOk(['create', vol, '--size', '1M'])
  for (const args of [['create', '--help'], ['list', vol, '--json'], ['--help']]) {
    const { code, stderr } = await runWithClosedOutput(args)
    assert.equal(code, 141, `${args.join(' ')}: exit ${code}, stderr ${stderr}`)
    assert.equal(stderr, '', `${args.join(' ')} printed to stderr`)
  }
})

test('closed stdout and stderr: serve keeps serving', async () => {
  const vol = join(T, 'served')
  await cliOk(['create', vol, '--size', '1M'])
  const port = await freePort()
  const [out, err] = [closedPipe(), closedPipe()]
  const server: ChildProcess = spawn(process.execPath, [BIN, 'serve', vol, '--listen', `127.0.0.1:${port}`], { stdio: ['ignore', out, err] })
  closeSync(out)
  closeSync(err)
  try {
    const size = async (): Promise<string | null> => {
      try {
        const { stdout } = await promisify(execFile)('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/served`])
        return stdout.trim()
      } catch {
        return null
      }
    }
    // Waits for the listener (a liveness wait: the verdict is what nbdinfo reads, not how soon).
    let first: string | null = null
    for (let i = 0; i < 300 && first === null && server.exitCode === null; i++) {
      first = await size()
      if (first === null) await new Promise((resolve) => setTimeout(resolve, 100))
    }
    assert.equal(first, String(1024 * 1024), `serve exited (${server.exitCode}) or never listened`)
    // It has logged connections to the closed stderr by now; it must still answer.
    assert.equal(await size(), String(1024 * 1024))
    assert.equal(server.exitCode, null)
  } finally {
    server.kill('SIGKILL')
  }
})
