/**
 * The version, read from package.json so that it is written down once. The file sits two levels
 * up from this module both in src/cli (run from sources) and in dist/cli (the package), and it is
 * read synchronously, which keeps the libuv pool untouched (bin.cts explains why that matters).
 */
import { readFileSync } from 'node:fs'

export const VERSION: string = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version
