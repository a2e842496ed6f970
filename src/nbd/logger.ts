/**
 * The logger the server accepts. Deliberately tiny and shaped so a pino instance (or a child
 * logger) is assignable; the default is silent, because library code never creates a logger.
 */
export interface NbdLogger {
  debug(msg: string): void
  info(msg: string): void
  warn(msg: string): void
  error(msg: string): void
}

export const silentLogger: NbdLogger = {
  debug() {},
  info() {},
  warn() {},
  error() {},
}
