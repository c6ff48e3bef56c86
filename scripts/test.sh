#!/usr/bin/env bash
# Sets up, builds and runs kvgate's test suite (what CI runs): the release build, then the same
# suite under AddressSanitizer + UBSan. GPU tests skip, saying so, when no GPU is found.
# KVGATE_SKIP_ASAN=1 skips the sanitizer pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -d ../shared/models ]; then
  echo "test.sh: ../shared/models is missing: the golden-model tests need it beside the repository" >&2
fi
# Python tools the tests use (kubernetes-validate for deploy/k8s; the training package's), in a
# virtual environment (Debian's Python refuses system-wide pip installs); it sees
# already-installed packages, so nothing is downloaded twice.
python3 -m venv --system-site-packages .venv
.venv/bin/python -m pip install --quiet -r tests/integration/requirements.txt \
  -r training/requirements.txt
cmake --preset release
cmake --build build
ctest --preset release --timeout 600
# Once more on the guarded backend (device memory the host cannot touch: any host code that
# reads or writes K/V, activations or weights outside the backend's ops crashes): the unit,
# model, cache, pipeline and serve suites (every C++ test and both integration tests select
# their device through KVGATE_DEVICE). GPU tests are left to the GPU.
KVGATE_DEVICE=guarded ctest --preset release --timeout 900 -LE "gpu|deploy"
if [ "${KVGATE_SKIP_ASAN:-0}" != "1" ]; then
  cmake --preset asan
  cmake --build build-asan
  ctest --preset asan --timeout 600
  # The soak, short: 200 streams for 60 s on the sanitized server, a worker restarted halfway
  # (bench/serving/soak.sh runs 1,000 streams for 10 minutes).
  KVGATE=build-asan/cli/kvgate STREAMS=200 DURATION=60 bash bench/serving/soak.sh
fi
# The parsers and request validation under libFuzzer (clang, ASan + UBSan), 30 s each; a crash
# fails the run with its reproducer. bench/fuzz/run.sh runs them for 10 million executions.
RUNS=-1 SECONDS_EACH=30 bash bench/fuzz/run.sh
# The training package's tests.
.venv/bin/python -m pytest -q training/tests
