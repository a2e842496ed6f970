/** An assert.rejects validator: a SnapError with `code`, a one-line message matching `pattern`. */
import assert from 'node:assert/strict'
import { SnapError } from '../../src/errors.js'

export function refusedWith(code: string, pattern: RegExp) {
  return (err: unknown) => {
    assert.ok(err instanceof SnapError, `a SnapError, got ${String(err)}`)
    assert.equal(err.code, code, err.message)
    assert.match(err.message, pattern)
    assert.doesNotMatch(err.message, /\n/)
    return true
  }
}
