#!/usr/bin/env bash
# Sets up, builds and runs kvgate's test suite (what CI runs). GPU tests skip, saying so,
# when no GPU is found.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -d ../shared/models ]; then
  echo "test.sh: ../shared/models is missing: the golden-model tests need it beside the repository" >&2
fi
cmake --preset release
cmake --build build
ctest --preset release --timeout 600
