/** Progress lines on stderr, stamped with seconds since the bench started. */
const T0 = performance.now()

export function secondsSinceStart(): number {
  return (performance.now() - T0) / 1000
}

export function log(msg: string): void {
  process.stderr.write(`[bench ${secondsSinceStart().toFixed(0).padStart(4)}s] ${msg}\n`)
}
