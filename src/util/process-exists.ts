/**
 * Whether a process with this PID exists, by signal 0. EPERM means it exists but belongs to
 * someone else, which still counts: callers judge whether an owner is gone, not whether they
 * may signal it.
 */
export function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}
