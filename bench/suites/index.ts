/**
 * Every suite, in the order they run and report: per-round suites first (interleaved round by
 * round), then the others one after another. Their floors rows and sections follow this order.
 * A new suite is one module exporting a Suite and one line here.
 */
import type { Suite } from '../lib/suite.js'
import { bigSuite } from './big.js'
import { firstTouchSuite } from './first-touch.js'
import { jsWorkSuite } from './js-work.js'
import { memorySuite } from './memory.js'
import { mergeSuite } from './merge.js'
import { rbdSuite } from './rbd.js'
import { scaleSuite } from './scale.js'
import { snapReadSuite } from './snap-read.js'
import { standardSuite } from './standard.js'
import { startupSuite } from './startup.js'

export const SUITES: readonly Suite[] = [
  standardSuite,
  firstTouchSuite,
  snapReadSuite,
  mergeSuite,
  scaleSuite,
  bigSuite,
  jsWorkSuite,
  startupSuite,
  memorySuite,
  rbdSuite,
]
