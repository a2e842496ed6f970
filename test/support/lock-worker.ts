/**
 * A process that contends for a volume lock on command, for the lock race test. Lines on stdin:
 * `acquire DIR ROUND` tries VolumeLock.acquire(DIR): the winner stamps its id into DIR/data at
 * ROUND's slot (what a real owner would do: write the volume) and answers `won ROUND`, a loser
 * answers `busy ROUND` (or `error ROUND message`); `release` releases and answers `released`.
 */
import { open } from 'node:fs/promises'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { isSnapError } from '../../src/errors.js'
import { VolumeLock } from '../../src/volume/volume-lock.js'

export const SLOT_BYTES = 8
const id = process.argv[2] ?? '?'
let held: VolumeLock | null = null

for await (const line of createInterface({ input: process.stdin })) {
  const [verb, dir, round] = line.split(' ')
  if (verb === 'acquire' && dir !== undefined && round !== undefined) {
    try {
      held = await VolumeLock.acquire(dir)
      const data = await open(join(dir, 'data'), 'r+')
      await data.write(Buffer.from(id.padEnd(SLOT_BYTES).slice(0, SLOT_BYTES)), 0, SLOT_BYTES, Number(round) * SLOT_BYTES)
      await data.close()
      process.stdout.write(`won ${round}\n`)
    } catch (err) {
      process.stdout.write(isSnapError(err, 'SNAP_BUSY') ? `busy ${round}\n` : `error ${round} ${(err as Error).message}\n`)
    }
  } else if (verb === 'release') {
    await held?.release()
    held = null
    process.stdout.write('released\n')
  }
}
