/**
 * Offline commands have no log: the volume's warning events that nothing else reports surface
 * as `blocksnap: warning: …` lines on stderr (a fill level crossed during `write`, an
 * autoextend the file system had no room for). Invalidation and overflow are said by the
 * command itself (output.ts snapshotWarnings).
 */
import type { Volume } from '../volume/volume.js'
import { describeVolumeEvent } from '../volume/volume-events.js'

/** Prints `volume`'s fill warnings on stderr until the returned function is called. */
export function printVolumeWarnings(volume: Volume): () => void {
  return volume.onEvent((event) => {
    if (event.type === 'fill-threshold' || event.type === 'cow-extend-failed') {
      process.stderr.write(`blocksnap: warning: ${describeVolumeEvent(event)}\n`)
    }
  })
}
