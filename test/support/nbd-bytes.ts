/**
 * An independent big-endian byte builder for NBD codec tests. It deliberately shares nothing
 * with src/protocol/nbd (no Buffer write helpers, no constants): expected bytes are spelled out
 * the way the spec's tables describe them.
 */
export class Bytes {
  private readonly parts: number[] = []

  u8(value: number): this {
    this.parts.push(value & 0xff)
    return this
  }

  u16(value: number): this {
    return this.u8(Math.floor(value / 0x100)).u8(value)
  }

  u32(value: number): this {
    return this.u16(Math.floor(value / 0x10000)).u16(value % 0x10000)
  }

  u64(value: number | bigint): this {
    const big = BigInt(value)
    return this.u32(Number(big >> 32n)).u32(Number(big & 0xffffffffn))
  }

  /** Raw bytes from a hex string such as "4e 42 44 4d" (spaces ignored). */
  hex(text: string): this {
    const clean = text.replace(/\s+/g, '')
    for (let i = 0; i < clean.length; i += 2) this.u8(parseInt(clean.slice(i, i + 2), 16))
    return this
  }

  ascii(text: string): this {
    for (const byte of new TextEncoder().encode(text)) this.u8(byte)
    return this
  }

  /** A u32 length followed by the UTF-8 string. */
  str32(text: string): this {
    const bytes = new TextEncoder().encode(text)
    this.u32(bytes.length)
    for (const byte of bytes) this.u8(byte)
    return this
  }

  fill(count: number, value = 0): this {
    for (let i = 0; i < count; i++) this.u8(value)
    return this
  }

  raw(bytes: Uint8Array): this {
    for (const byte of bytes) this.u8(byte)
    return this
  }

  get length(): number {
    return this.parts.length
  }

  build(): Buffer {
    return Buffer.from(this.parts)
  }
}

export const bytes = () => new Bytes()

/** An option request: IHAVEOPT, code, length, data. */
export function optionBytes(code: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  return bytes().ascii('IHAVEOPT').u32(code).u32(data.length).raw(data).build()
}

/** A compact request header, plus payload if given. */
export function requestBytes(
  fields: { flags?: number; type: number; cookie?: number | bigint; offset?: number | bigint; length: number },
  payload?: Uint8Array,
): Buffer {
  const b = bytes()
    .u32(0x25609513)
    .u16(fields.flags ?? 0)
    .u16(fields.type)
    .u64(fields.cookie ?? 0)
    .u64(fields.offset ?? 0)
    .u32(fields.length)
  // Concatenated, not pushed byte by byte: payloads in tests reach 33 MiB.
  return payload ? Buffer.concat([b.build(), payload]) : b.build()
}

/** INFO/GO data: u32 name length, name, u16 count, u16 info types. */
export function infoRequestBytes(name: string, infos: number[] = []): Buffer {
  const b = bytes().str32(name).u16(infos.length)
  for (const info of infos) b.u16(info)
  return b.build()
}

/** META_CONTEXT data: u32 name length, name, u32 count, (u32 length, query)*. */
export function metaContextBytes(name: string, queries: string[]): Buffer {
  const b = bytes().str32(name).u32(queries.length)
  for (const query of queries) b.str32(query)
  return b.build()
}
