#!/usr/bin/env node
// Launcher: registers tsx's loader (resolved next to this file, whatever the cwd) and runs the
// TypeScript CLI, so no build step is needed.
import { register } from 'tsx/esm/api'
import { pathToFileURL, fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'
register()
const here = dirname(fileURLToPath(import.meta.url))
await import(pathToFileURL(join(here, '..', 'src', 'cli', 'main.ts')).href)
