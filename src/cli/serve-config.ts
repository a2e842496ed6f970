/**
 * `serve --config FILE`: a JSON file whose keys mirror the serve flags, checked against a zod
 * schema so that every mistake is reported as one line naming the key (`tls.mode: expected one
 * of off|allow|require`). Flags given on the command line override the file; positional VOLs
 * replace its `volumes`. Relative paths in the file are relative to the file's directory, so a
 * file means the same whatever directory serve starts in.
 *
 * Loaded only by `serve --config`, so other commands never pay for zod.
 */
import { readFile } from 'node:fs/promises'
import { dirname, resolve } from 'node:path'
import type { Command } from 'commander'
import { z } from 'zod'
import { parseSize } from '../units.js'

/** A configuration file that cannot be used; the message names the file and the key. */
export class ConfigError extends Error {}

const HOST_PORT = /^(.*):(\d+)$/

function size(what: string, min: number) {
  return z
    .union([z.number(), z.string()], { errorMap: () => ({ message: `expected a ${what}: bytes, or a string such as "16M"` }) })
    .transform((value, ctx) => {
      const bytes = typeof value === 'number' ? value : parseSize(value)
      const problem = !Number.isSafeInteger(bytes) ? `expected a ${what}: bytes, or a number with K, M, G or T` : bytes < min ? `expected at least ${min} bytes` : null
      if (problem !== null) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: `${problem}, got ${JSON.stringify(value)}` })
        return z.NEVER
      }
      return bytes
    })
}

const path = z.string().min(1, 'expected a path, got ""')
const hostPort = z.string().refine((text) => {
  const m = HOST_PORT.exec(text)
  return m !== null && Number(m[2]) <= 65535
}, 'expected HOST:PORT')

const tlsSchema = z
  .object({
    mode: z.enum(['off', 'allow', 'require']),
    psk: path,
    cert: path,
    key: path,
    ca: path,
    verifyPeer: z.boolean(),
  })
  .partial()
  .strict()
  .superRefine((tls, ctx) => {
    if (tls.cert !== undefined && tls.key === undefined) ctx.addIssue({ code: 'custom', path: ['key'], message: 'required with tls.cert' })
    if (tls.key !== undefined && tls.cert === undefined) ctx.addIssue({ code: 'custom', path: ['cert'], message: 'required with tls.key' })
    if (tls.ca !== undefined && tls.cert === undefined) ctx.addIssue({ code: 'custom', path: ['ca'], message: 'needs tls.cert and tls.key (client certificates are asked for in a certificate handshake)' })
    if (tls.verifyPeer === true && tls.ca === undefined) ctx.addIssue({ code: 'custom', path: ['verifyPeer'], message: 'needs tls.ca (the CA that signs client certificates)' })
  })

export const serveConfigSchema = z
  .object({
    volumes: z.array(path).min(1, 'expected at least one volume'),
    listen: hostPort,
    socket: path,
    readOnly: z.boolean(),
    tls: tlsSchema,
    writeBack: size('write-back size', 0),
    handshakeLimit: z.number().int().min(0),
    maxConnections: z.number().int().min(1),
    maxPending: size('pending size', 1),
    /** `serve --metrics`: HOST:PORT, or a port (loopback). */
    metrics: z.union([z.string().min(1), z.number().int().min(0).max(65535)], {
      errorMap: () => ({ message: 'expected HOST:PORT or a port number' }),
    }),
    pidFile: path,
    logFile: path,
    leaseSeconds: z.number().int().min(1).max(3600),
  })
  .partial()
  .strict()

export type ServeConfigFile = z.infer<typeof serveConfigSchema>

function keyPath(segments: readonly (string | number)[]): string {
  return segments.map((s, i) => (typeof s === 'number' ? `[${s}]` : i === 0 ? s : `.${s}`)).join('')
}

const article = (word: string) => (/^[aeiou]/.test(word) ? `an ${word}` : `a ${word}`)

/** One zod issue as `key.path: what is wrong`. */
export function describeIssue(issue: z.ZodIssue): string {
  let at: (string | number)[] = [...issue.path]
  let message = issue.message
  switch (issue.code) {
    case 'unrecognized_keys':
      at = [...at, issue.keys[0] as string]
      message = `unknown key${issue.keys.length > 1 ? ` (also ${issue.keys.slice(1).join(', ')})` : ''}`
      break
    case 'invalid_type':
      if (issue.received === 'undefined') message = 'required'
      else if (issue.expected === 'integer') message = 'expected an integer'
      else message = `expected ${article(issue.expected)}, got ${issue.received === 'null' ? 'null' : article(issue.received)}`
      break
    case 'invalid_enum_value':
      message = `expected one of ${issue.options.join('|')}, got ${JSON.stringify(issue.received)}`
      break
    case 'too_small':
      if (issue.type === 'number') message = `expected at least ${issue.minimum}`
      break
    case 'too_big':
      if (issue.type === 'number') message = `expected at most ${issue.maximum}`
      break
  }
  return at.length === 0 ? message : `${keyPath(at)}: ${message}`
}

/** The file's settings, paths made absolute, as the serve command's option values. */
export interface ServeConfig {
  readonly volumes?: readonly string[]
  /** commander attribute name (`tlsPsk`, `maxPending`, ...) to value, as the flag would give it. */
  readonly options: ReadonlyMap<string, unknown>
}

/** Reads and checks `file`; throws ConfigError with one line naming `file` and the key. */
export async function loadServeConfig(file: string): Promise<ServeConfig> {
  let text: string
  try {
    text = await readFile(file, 'utf8')
  } catch (err) {
    throw new ConfigError(`${file}: cannot read it: ${(err as Error).message}`)
  }
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch (err) {
    throw new ConfigError(`${file}: not valid JSON: ${(err as Error).message}`)
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) throw new ConfigError(`${file}: expected a JSON object of serve settings`)
  const parsed = serveConfigSchema.safeParse(json)
  if (!parsed.success) throw new ConfigError(`${file}: ${describeIssue(parsed.error.issues[0] as z.ZodIssue)}`)
  return toOptions(parsed.data, dirname(resolve(file)))
}

function toOptions(config: ServeConfigFile, base: string): ServeConfig {
  const abs = (p: string | undefined) => (p === undefined ? undefined : resolve(base, p))
  const { tls = {} } = config
  const options = new Map<string, unknown>(
    Object.entries({
      listen: config.listen,
      socket: abs(config.socket),
      readOnly: config.readOnly,
      tls: tls.mode,
      tlsPsk: abs(tls.psk),
      tlsCert: abs(tls.cert),
      tlsKey: abs(tls.key),
      tlsCa: abs(tls.ca),
      tlsVerifyPeer: tls.verifyPeer,
      writeBack: config.writeBack,
      handshakeLimit: config.handshakeLimit,
      maxConnections: config.maxConnections,
      maxPending: config.maxPending,
      metrics: config.metrics === undefined ? undefined : String(config.metrics),
      pidFile: abs(config.pidFile),
      logFile: abs(config.logFile),
    }).filter(([, value]) => value !== undefined),
  )
  return { ...(config.volumes ? { volumes: config.volumes.map((v) => resolve(base, v)) } : {}), options }
}

/** Option names whose config value is the flag's text, parsed by the option's own parser. */
const PARSED_BY_OPTION = new Set(['metrics'])

/**
 * Sets the file's values on `command` for every option the command line did not give, so the
 * serve action sees one set of option values (flags first, then the file, then defaults).
 */
export function applyServeConfig(command: Command, config: ServeConfig, file: string): void {
  for (const [name, value] of config.options) {
    const option = command.options.find((o) => o.attributeName() === name)
    if (option === undefined) {
      // An option of a newer (or trimmed) blocksnap: say so rather than ignore a setting.
      const flag = name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)
      throw new ConfigError(`${file}: ${name}: this blocksnap serve has no --${flag} option`)
    }
    const source = command.getOptionValueSource(name)
    if (source === 'cli' || source === 'env') continue
    let parsed = value
    if (PARSED_BY_OPTION.has(name) && option.parseArg) {
      try {
        parsed = option.parseArg(String(value), undefined)
      } catch (err) {
        throw new ConfigError(`${file}: ${name}: ${(err as Error).message}`)
      }
    }
    command.setOptionValueWithSource(name, parsed, 'config')
  }
}
