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
# The CLI tests run the compiled CLI (dist/), as the package does; a stale dist would test old code.
if ! npm run --silent build; then
  echo "run-tests: the build failed (npm run build); not running tests against a stale dist/" >&2
  exit 1
fi
exec node --import tsx --test --test-concurrency=2 --test-reporter=spec "${files[@]}"
