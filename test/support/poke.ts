/** Overwrites `bytes` at `offset` of an existing file in place (damaging a COW, say). */
import { open } from 'node:fs/promises'

export async function poke(file: string, offset: number, bytes: Uint8Array): Promise<void> {
  const h = await open(file, 'r+')
  try {
    await h.write(bytes, 0, bytes.length, offset)
  } finally {
    await h.close()
  }
}
