/**
 * A real full file system for the out-of-space tests: a small tmpfs mounted for one test (root
 * only; the test is skipped with the reason otherwise), and a filler that takes its last byte.
 */
import { spawnSync } from 'node:child_process'
import { appendFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

/** Mounts a tmpfs of `sizeMiB` on `dir`; null, or why not. */
function mountTmpfs(dir: string, sizeMiB: number): string | null {
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m`, 'tmpfs', dir], { encoding: 'utf8' })
  if (r.error) return `mount not available: ${r.error.message}`
  if (r.status !== 0) return `mount -t tmpfs not permitted: ${(r.stderr || '').trim()}`
  return null
}

/**
 * Runs `fn` with a fresh tmpfs of `sizeMiB` mounted at `mnt` (and a scratch directory `T` beside
 * it, off the tmpfs); unmounts and removes both afterwards. Calls `skip` instead when no tmpfs
 * can be mounted here.
 */
export async function onTmpfs(sizeMiB: number, fn: (mnt: string, T: string) => Promise<void>, skip: (reason: string) => void): Promise<void> {
  const T = await mkdtemp(join(tmpdir(), 'blocksnap-tmpfs-'))
  const mnt = join(T, 'mnt')
  await mkdir(mnt)
  const refused = mountTmpfs(mnt, sizeMiB)
  if (refused) {
    await rm(T, { recursive: true, force: true })
    skip(refused)
    return
  }
  try {
    await fn(mnt, T)
  } finally {
    spawnSync('umount', [mnt])
    await rm(T, { recursive: true, force: true })
  }
}

/** Fills the file system holding `filler` (a new file) to its last byte, halving the pieces down to 512. */
export async function fillFileSystem(filler: string): Promise<void> {
  await writeFile(filler, Buffer.alloc(0))
  for (let piece = 1024 * 1024; piece >= 512; piece /= 2) {
    while (await appendFile(filler, Buffer.alloc(piece)).then(() => true, () => false));
  }
}
