/**
 * The `serve --metrics` listener: Prometheus text at /metrics, the live status page at /, and
 * the status page's data at /status.json. Read-only: GET and HEAD only, no request bodies.
 *
 * Design notes:
 * - Bound to loopback unless told otherwise. On loopback, a request must name a loopback host
 *   (Host: localhost, 127.x.x.x or [::1]): a web page the operator visits cannot point a DNS name
 *   at 127.0.0.1 and read the status through the browser (DNS rebinding).
 * - The page's Content-Security-Policy lets it load nothing from anywhere: its style and script
 *   are inline and it only fetches status.json from this listener.
 * - close() drops idle keep-alive connections (browsers, Prometheus), so `serve` stops promptly.
 */
import http from 'node:http'
import net from 'node:net'
import type { NbdLogger } from '../nbd/logger.js'
import type { ServiceMetrics } from './metrics.js'
import { STATUS_PAGE_HTML } from './status-page.js'

export interface ServiceAddress {
  readonly host: string
  readonly port: number
}

const PAGE_POLICY = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

/** More clients than Prometheus and a few browser tabs need, and far fewer than descriptors. */
const MAX_HTTP_CONNECTIONS = 64

/** Whether `host` (a literal address or name, no port) is loopback. */
export function isLoopbackHost(host: string): boolean {
  const bare = host.replace(/^\[(.*)\]$/, '$1').toLowerCase()
  if (bare === 'localhost' || bare.endsWith('.localhost')) return true
  if (net.isIPv4(bare)) return bare.startsWith('127.')
  if (net.isIPv6(bare)) return bare === '::1' || /^::ffff:127\./.test(bare)
  return false
}

/** The host part of a Host header ('[::1]:9100' -> '[::1]', 'a:80' -> 'a'). */
function hostOfHeader(header: string): string {
  if (header.startsWith('[')) return header.slice(0, header.indexOf(']') + 1)
  const colon = header.lastIndexOf(':')
  return colon === -1 ? header : header.slice(0, colon)
}

export class ServiceHttpServer {
  private readonly metrics: ServiceMetrics
  private readonly log: NbdLogger
  private readonly server: http.Server
  private loopbackOnly = false
  private closing: Promise<void> | null = null

  constructor(metrics: ServiceMetrics, log: NbdLogger) {
    this.metrics = metrics
    this.log = log
    this.server = http.createServer({ requestTimeout: 30_000, headersTimeout: 10_000 }, (req, res) => void this.handle(req, res))
    this.server.maxConnections = MAX_HTTP_CONNECTIONS
    this.server.keepAliveTimeout = 5_000
  }

  /** Listens on `host:port` (port 0: any free port); resolves with the bound address. */
  async listen(host: string, port: number): Promise<ServiceAddress> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject)
      this.server.listen(port, host, () => {
        this.server.off('error', reject)
        resolve()
      })
    })
    this.server.on('error', (err) => this.log.error(`metrics listener: ${err.message}`))
    const address = this.server.address() as net.AddressInfo
    this.loopbackOnly = isLoopbackHost(address.address)
    return { host: address.address, port: address.port }
  }

  close(): Promise<void> {
    this.closing ??= new Promise<void>((resolve) => {
      this.server.close(() => resolve())
      this.server.closeAllConnections()
    })
    return this.closing
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    res.setHeader('X-Content-Type-Options', 'nosniff')
    res.setHeader('Cache-Control', 'no-store')
    if (this.loopbackOnly && !isLoopbackHost(hostOfHeader(req.headers.host ?? ''))) {
      return this.reply(res, 403, 'text/plain; charset=utf-8', 'blocksnap: this listener answers only requests to a loopback host name\n')
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('Allow', 'GET, HEAD')
      return this.reply(res, 405, 'text/plain; charset=utf-8', `blocksnap: ${req.method} is not allowed here\n`)
    }
    const path = (req.url ?? '/').split('?')[0]
    try {
      switch (path) {
        case '/metrics':
          return this.reply(res, 200, this.metrics.contentType, await this.metrics.text())
        case '/status.json':
          return this.reply(res, 200, 'application/json; charset=utf-8', `${JSON.stringify(await this.metrics.status())}\n`)
        case '/':
        case '/index.html':
          res.setHeader('Content-Security-Policy', PAGE_POLICY)
          res.setHeader('Referrer-Policy', 'no-referrer')
          return this.reply(res, 200, 'text/html; charset=utf-8', STATUS_PAGE_HTML)
        default:
          return this.reply(res, 404, 'text/plain; charset=utf-8', `blocksnap: no ${path} here: try / (status page), /status.json or /metrics\n`)
      }
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err)
      this.log.warn(`metrics listener: ${path}: ${message}`)
      return this.reply(res, 500, 'text/plain; charset=utf-8', `blocksnap: error: ${message}\n`)
    }
  }

  private reply(res: http.ServerResponse, status: number, type: string, body: string): void {
    res.statusCode = status
    res.setHeader('Content-Type', type)
    res.setHeader('Content-Length', Buffer.byteLength(body))
    res.end(res.req.method === 'HEAD' ? undefined : body)
  }
}
