#!/usr/bin/env bash
# Interop tests against the real Linux dm-snapshot, booted under qemu (TCG). Needs the Debian
# packages qemu-system-x86 busybox-static dmsetup cpio e2fsprogs (and apt-get/dpkg to fetch the kernel
# package into $BLOCKSNAP_KERNEL_CACHE, default /var/tmp/blocksnap-kernel). See test/kernel/vm.ts.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests run the compiled CLI (bin/blocksnap runs dist/cli/bin.cjs).
if ! npm run --silent build; then
  echo "kernel-test: the build failed (npm run build)" >&2
  exit 1
fi
files=(test/kernel/interop.test.ts test/kernel/traces.test.ts test/kernel/filesystem.test.ts)
exec node --import tsx --test --test-concurrency=1 --test-reporter=spec "${files[@]}"
