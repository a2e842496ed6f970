#!/usr/bin/env node
/**
 * The `blocksnap` executable. CommonJS on purpose: libuv sizes its I/O thread pool from
 * UV_THREADPOOL_SIZE once, at the first use of the pool, and Node 20 loads an ES module entry
 * point with asynchronous reads that already start the pool. A CommonJS entry is read
 * synchronously, so the variable set here is still the one libuv sees; the CLI itself (ES
 * modules) is imported afterwards.
 *
 * The pool size matters: every file read and write of the engine runs on it, and Node's fixed
 * default of 4 threads oversubscribes small machines (on 2 cores, 4 KiB random I/O ran 1.6x faster
 * with 1 thread than with 4; see BENCHMARKS.md). The default leaves one core to the event loop;
 * set UV_THREADPOOL_SIZE yourself to override it (more threads help when the files sit on slow
 * disks rather than in the page cache).
 */
const os: typeof import('node:os') = require('node:os')

if (!process.env.UV_THREADPOOL_SIZE) {
  process.env.UV_THREADPOOL_SIZE = String(Math.min(16, Math.max(1, os.availableParallelism() - 1)))
}
void import('./main.js')
