/**
 * Block-status extent normalisation: what a server may put on the wire for a BLOCK_STATUS
 * request, whatever its provider answered. Pure; shared by the server (which sends extents) and
 * any client that wants to check what it received.
 */
import { MAX_BLOCK_STATUS_EXTENTS } from './constants.js'
import type { Extent } from './reply.js'

/**
 * Makes a provider's extents valid on the wire: non-empty, positive lengths, inside the request,
 * one descriptor under REQ_ONE, at most 2^20 descriptors, neighbours with equal flags merged.
 * An empty or useless answer becomes one "allocated data" descriptor, always a safe status.
 */
export function normalizeExtents(raw: readonly Extent[], requestLength: number, reqOne: boolean): Extent[] {
  const out: { length: number; flags: number }[] = []
  let covered = 0
  for (const extent of raw) {
    if (covered >= requestLength || out.length >= MAX_BLOCK_STATUS_EXTENTS) break
    if (!Number.isSafeInteger(extent.length) || extent.length <= 0) break
    const length = Math.min(extent.length, requestLength - covered)
    const flags = extent.flags >>> 0
    const previous = out[out.length - 1]
    if (previous !== undefined && previous.flags === flags) previous.length += length
    else out.push({ length, flags })
    covered += length
    if (reqOne) break
  }
  if (out.length === 0) return [{ length: requestLength, flags: 0 }]
  if (reqOne) out.length = 1
  return out
}
