/**
 * Which volume uses an in-place origin (`create VOL --origin PATH`). Two volumes over one origin
 * corrupt each other's snapshots: an origin write through one never saves the old data into the
 * other's COWs. The origin itself cannot say who uses it (blocksnap never writes it outside its
 * data), so the claim is recorded beside the user's other state: one small file per origin,
 * named by the origin's identity (inode of a file, device number of a block device, so an alias
 * path or a hard link is the same origin; for a device URI, its server and export), holding the
 * volume directory that claimed it.
 *
 * Design notes:
 * - An entry is trusted only while it is true: the volume it names still has a manifest whose
 *   external origin is this very storage. A volume deleted with `rm -rf`, moved, or recreated on
 *   another origin leaves a stale entry, which the next claim replaces; nothing needs cleaning.
 * - Claims happen under the origin's flock (origin-lock.ts), so two claims of one origin never
 *   interleave; entries are written atomically (temp file, rename).
 * - The registry is per state directory: $BLOCKSNAP_STATE_DIR, else /var/lib/blocksnap for root,
 *   else $XDG_STATE_HOME/blocksnap (~/.local/state/blocksnap). Volumes made by users with different
 *   state directories do not see each other's claims; the origin flock still refuses using one
 *   origin from two volumes at once, whoever made them.
 */
import { mkdir, readFile, rename, unlink, writeFile } from 'node:fs/promises'
import { homedir } from 'node:os'
import { isAbsolute, join, resolve } from 'node:path'
import { SnapError } from '../errors.js'
import { identityOfAddress } from '../device/image-file.js'
import { isExternalOrigin, originPathOf, readManifest } from './manifest.js'

const ORIGINS_DIR = 'origins'

/** The directory holding blocksnap's per-user state (see the top). */
export function stateDir(): string {
  const configured = process.env.BLOCKSNAP_STATE_DIR
  if (configured) return resolve(configured)
  if (process.getuid?.() === 0) return '/var/lib/blocksnap'
  const xdg = process.env.XDG_STATE_HOME
  return isAbsolute(xdg ?? '') ? join(xdg as string, 'blocksnap') : join(homedir(), '.local', 'state', 'blocksnap')
}

function entryPath(identity: string): string {
  // "inode 64768:1234" -> "inode-64768-1234", "block 7:0" -> "block-7-0"
  return join(stateDir(), ORIGINS_DIR, identity.replace(/[^A-Za-z0-9]+/g, '-'))
}

/** The file whose flock stands for a lock on an origin with no local file (a device URI). */
export function originLockFile(identity: string): string {
  return `${entryPath(identity)}.lock`
}

interface Entry {
  readonly volume: string
  readonly origin: string
}

async function readEntry(identity: string): Promise<Entry | null> {
  const text = await readFile(entryPath(identity), 'utf8').catch(() => null)
  if (text === null) return null
  try {
    const parsed = JSON.parse(text) as Partial<Entry>
    return typeof parsed.volume === 'string' && isAbsolute(parsed.volume) ? { volume: parsed.volume, origin: String(parsed.origin) } : null
  } catch {
    return null // a torn or foreign file claims nothing
  }
}

/** True when volume `dir` has an external origin that is the storage `identity`. */
async function usesOrigin(dir: string, identity: string): Promise<boolean> {
  try {
    const manifest = await readManifest(dir)
    return isExternalOrigin(manifest) && (await identityOfAddress(originPathOf(dir, manifest))) === identity
  } catch {
    return false
  }
}

/** The volume directory that uses origin `identity`, per the registry, if that is still true. */
export async function originOwner(identity: string): Promise<string | null> {
  const entry = await readEntry(identity)
  return entry !== null && (await usesOrigin(entry.volume, identity)) ? entry.volume : null
}

const claimedBy = (origin: string, owner: string) =>
  new SnapError('SNAP_BUSY', `origin ${origin} is already used by volume ${owner}`, { details: { path: origin } })

/**
 * Records that volume `dir` uses origin `originPath` (storage `identity`); refused when another
 * volume still uses it. With `bestEffort`, a registry that cannot be written is left as it is
 * (opening a volume must not depend on it); otherwise that is an error too.
 */
export async function claimOrigin(identity: string, originPath: string, dir: string, options: { bestEffort?: boolean } = {}): Promise<void> {
  const entry = await readEntry(identity)
  if (entry !== null && entry.volume !== dir && (await usesOrigin(entry.volume, identity))) throw claimedBy(originPath, entry.volume)
  if (entry !== null && entry.volume === dir && entry.origin === originPath) return
  const path = entryPath(identity)
  const temp = `${path}.tmp-${process.pid}`
  try {
    await mkdir(join(stateDir(), ORIGINS_DIR), { recursive: true, mode: 0o700 })
    await writeFile(temp, `${JSON.stringify({ volume: dir, origin: originPath })}\n`, { mode: 0o600 })
    await rename(temp, path)
  } catch (err) {
    await unlink(temp).catch(() => {})
    if (options.bestEffort) return
    throw new SnapError(
      'SNAP_IO',
      `cannot record origin ${originPath} in ${join(stateDir(), ORIGINS_DIR)}: ${(err as Error).message} (BLOCKSNAP_STATE_DIR chooses another directory)`,
      { cause: err },
    )
  }
}

/** Forgets volume `dir`'s claim on origin `identity` (a create that failed); others' claims stay. */
export async function releaseOrigin(identity: string, dir: string): Promise<void> {
  const entry = await readEntry(identity)
  if (entry?.volume === dir) await unlink(entryPath(identity)).catch(() => {})
}
