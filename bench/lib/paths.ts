import { dirname, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

/** bench/ */
export const BENCH_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..')
/** The repository root. */
export const ROOT = resolve(BENCH_DIR, '..')
