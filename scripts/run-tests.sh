#!/usr/bin/env bash
# Runs every test file explicitly: on Node 20 `node --test dir/` finds no .ts files,
# so an empty list must be an error rather than a silent pass.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(find test -name '*.test.ts' -not -path '*/kernel/*' | sort)
if [ "${#files[@]}" -eq 0 ]; then
  echo "run-tests: no test files found under test/" >&2
  exit 1
fi
npx tsc --noEmit
exec node --import tsx --test --test-concurrency=2 --test-reporter=spec "${files[@]}"
