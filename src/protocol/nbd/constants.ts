/**
 * NBD wire constants (fixed newstyle handshake, compact requests, simple and structured
 * replies). Values come from the NBD protocol document; every integer is big-endian on the
 * wire. 64-bit magics are kept as two u32 halves so no hot path ever touches bigint.
 *
 * `as const` objects instead of enums: erasableSyntaxOnly forbids enums, and plain objects keep
 * the numbers greppable next to their names.
 */

/** "NBDMAGIC", split into high and low u32. */
export const NBD_MAGIC_HI = 0x4e42444d
export const NBD_MAGIC_LO = 0x41474943
/** "IHAVEOPT": bytes 8..15 of the greeting and the start of every option request. */
export const IHAVEOPT_HI = 0x49484156
export const IHAVEOPT_LO = 0x454f5054
/** Start of every option reply. */
export const OPTION_REPLY_MAGIC_HI = 0x0003e889
export const OPTION_REPLY_MAGIC_LO = 0x045565a9

export const REQUEST_MAGIC = 0x25609513
export const SIMPLE_REPLY_MAGIC = 0x67446698
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef

export const GREETING_BYTES = 18
export const CLIENT_FLAGS_BYTES = 4
export const OPTION_HEADER_BYTES = 16
export const OPTION_REPLY_HEADER_BYTES = 20
export const REQUEST_HEADER_BYTES = 28
export const SIMPLE_REPLY_HEADER_BYTES = 16
export const STRUCTURED_REPLY_HEADER_BYTES = 20
/** Zero padding after the EXPORT_NAME reply unless the client set C_NO_ZEROES. */
export const EXPORT_NAME_PADDING_BYTES = 124

export const HandshakeFlag = {
  FIXED_NEWSTYLE: 0x1,
  NO_ZEROES: 0x2,
} as const

export const ClientFlag = {
  FIXED_NEWSTYLE: 0x1,
  NO_ZEROES: 0x2,
} as const

export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const

export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const

export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const

export const TransmissionFlag = {
  HAS_FLAGS: 0x0001,
  READ_ONLY: 0x0002,
  SEND_FLUSH: 0x0004,
  SEND_FUA: 0x0008,
  ROTATIONAL: 0x0010,
  SEND_TRIM: 0x0020,
  SEND_WRITE_ZEROES: 0x0040,
  SEND_DF: 0x0080,
  CAN_MULTI_CONN: 0x0100,
  SEND_RESIZE: 0x0200,
  SEND_CACHE: 0x0400,
  SEND_FAST_ZERO: 0x0800,
} as const

export const Command = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const

export const CommandFlag = {
  FUA: 0x01,
  NO_HOLE: 0x02,
  DF: 0x04,
  REQ_ONE: 0x08,
  FAST_ZERO: 0x10,
  PAYLOAD_LEN: 0x20,
} as const

export const ReplyFlag = {
  DONE: 0x1,
} as const

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const

/** NBD error values: the only ones the spec allows on the wire. */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const
export type NbdErrnoValue = (typeof NbdErrno)[keyof typeof NbdErrno]

export const BaseAllocation = {
  CONTEXT: 'base:allocation',
  HOLE: 0x1,
  ZERO: 0x2,
} as const

/** Block size constraints we advertise: byte-granular, 4 KiB preferred, 32 MiB payloads. */
export const MIN_BLOCK_BYTES = 1
export const PREFERRED_BLOCK_BYTES = 4096
export const MAX_PAYLOAD_BYTES = 32 * 1024 * 1024

/** Strings (names, queries) are at most 4096 bytes per the spec. */
export const MAX_STRING_BYTES = 4096
/**
 * Cap on option data we buffer. The largest legitimate option is a META_CONTEXT request with
 * many queries; 64 KiB leaves room for that and keeps a hostile client from making us buffer
 * 4 GiB during the handshake.
 */
export const MAX_OPTION_DATA_BYTES = 64 * 1024
/**
 * Options one connection may send before choosing an export (the spec sets no number; nbdkit
 * allows 32). A client needs a handful, a listing client about two per export; past this a
 * client is looping, and it is dropped rather than answered for as long as it likes.
 */
export const MAX_HANDSHAKE_OPTIONS = 1024
/** The spec's cap on descriptors per BLOCK_STATUS chunk. */
export const MAX_BLOCK_STATUS_EXTENTS = 1 << 20

function nameOf(table: Record<string, number>, value: number): string {
  for (const key in table) if (table[key] === value) return key
  return `UNKNOWN(${value})`
}

/** Readable names for logs (nbdkit's name_of_nbd_cmd habit). */
export const nameOfCommand = (value: number) => `NBD_CMD_${nameOf(Command, value)}`
export const nameOfOption = (value: number) => `NBD_OPT_${nameOf(Option, value)}`
export const nameOfRep = (value: number) => `NBD_REP_${nameOf(Rep, value)}`
export const nameOfErrno = (value: number) => `NBD_${nameOf(NbdErrno, value)}`
