/**
 * When the reader of stdout or stderr goes away (`blocksnap list | head -1`, a pager quit early).
 * Node ignores SIGPIPE, so every later write fails with EPIPE, and that error, unhandled, printed
 * a stack trace. A command now ends quietly with the broken-pipe status (EXIT_BROKEN_PIPE), as
 * coreutils' tools do: nobody is left to read a message. A running server is not stopped by its
 * log reader leaving: it keeps serving, and what it would have printed is dropped.
 */
import { EXIT_BROKEN_PIPE } from './exit-codes.js'

let serving = false

/** Once, at CLI start. */
export function watchClosedOutput(): void {
  for (const stream of [process.stdout, process.stderr]) {
    stream.on('error', (err: NodeJS.ErrnoException) => {
      // After the first EPIPE the stream is destroyed and later writes fail that way instead.
      const closed = err.code === 'EPIPE' || err.code === 'ERR_STREAM_DESTROYED'
      if (!closed) throw err
      if (!serving) process.exit(EXIT_BROKEN_PIPE)
    })
  }
}

/** Called by `serve` once it serves: a closed stdout or stderr no longer ends the process. */
export function keepServingWhenOutputCloses(): void {
  serving = true
}
