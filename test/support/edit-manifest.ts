/** Rewrites a volume's manifest through `edit`, as a user (or an attacker) editing volume.json would. */
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { MANIFEST_FILE } from '../../src/volume/manifest.js'

export type Json = Record<string, unknown>

export async function editManifest(vol: string, edit: (m: Json & { snapshots: Json[] }) => void): Promise<void> {
  const path = join(vol, MANIFEST_FILE)
  const m = JSON.parse(await readFile(path, 'utf8'))
  edit(m)
  await writeFile(path, JSON.stringify(m))
}
