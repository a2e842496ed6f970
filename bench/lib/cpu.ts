/** /proc sampling: CPU ticks of the whole machine and of single processes, and whether a VM runs. */
import { spawnSync } from 'node:child_process'
import { readFileSync } from 'node:fs'

export const TICK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100

export function systemBusyTicks(): number {
  const f = (readFileSync('/proc/stat', 'utf8').split('\n')[0] as string).trim().split(/\s+/).slice(1).map(Number)
  // user nice system idle iowait irq softirq steal
  return (f[0] ?? 0) + (f[1] ?? 0) + (f[2] ?? 0) + (f[5] ?? 0) + (f[6] ?? 0) + (f[7] ?? 0)
}

export function procTicks(pid: number | 'self', children = false): number {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ').map(Number)
    // fields after the comm: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
    return (f[11] ?? 0) + (f[12] ?? 0) + (children ? (f[13] ?? 0) + (f[14] ?? 0) : 0)
  } catch {
    return 0
  }
}

export function vmRunning(): boolean {
  return spawnSync('pgrep', ['-f', 'qemu-system'], { encoding: 'utf8' }).status === 0
}

export function loadavg1(): number {
  return Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0])
}
