/**
 * `serve`'s events: the volumes' (volume-events.ts) and its NBD clients' errors, logged as
 * structured pino records (the event's fields, `event` naming its type, and a one-line message)
 * and handed to the --on-event hook.
 */
import type { Logger } from 'pino'
import type { NbdClientFault } from '../nbd/client-fault.js'
import { type EventLevel, type VolumeEvent, describeVolumeEvent, volumeEventLevel } from '../volume/volume-events.js'

export type ClientErrorEvent = { readonly type: 'client-error' } & NbdClientFault

export type ServiceEvent = VolumeEvent | ClientErrorEvent

export function clientErrorEvent(fault: NbdClientFault): ClientErrorEvent {
  return { type: 'client-error', ...fault }
}

function levelOf(event: ServiceEvent): EventLevel {
  if (event.type !== 'client-error') return volumeEventLevel(event)
  return event.kind === 'internal' ? 'error' : 'warn'
}

function describe(event: ServiceEvent): string {
  if (event.type !== 'client-error') return describeVolumeEvent(event)
  const where = event.export === null ? '' : ` (export ${event.export})`
  const request = event.command === undefined ? '' : `${event.command} -> ${event.errno ?? '?'}: `
  return `${event.client}${where}: ${event.kind}: ${request}${event.message}`
}

/** One pino record: `{ event: TYPE, ...fields }` at the event's level, with its message. */
export function logServiceEvent(log: Logger, event: ServiceEvent): void {
  const { type, ...fields } = event
  log[levelOf(event)]({ event: type, ...fields }, describe(event))
}
