#!/usr/bin/env bash
# Installs every Debian package kvgate's build and tests need. Idempotent.
# Works as root on a fresh Debian 12; uses sudo otherwise.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git python3
  libabsl-dev nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev
  libpcre2-dev libicu-dev libopenblas-dev libomp-dev
  python3-venv python3-pip bible-kjv bible-kjv-text fortunes dict-jargon dict-devil
  libgtest-dev libgmock-dev libbenchmark-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libssl-dev openssl python3-grpcio python3-protobuf clang libclang-rt-14-dev
  iproute2 nftables slurm-wlm munge libcpp-httplib-dev curl prometheus
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup.sh: not root and no sudo; install: ${PACKAGES[*]}" >&2; exit 1; }
  SUDO="sudo"
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup.sh: all packages present"
else
  echo "setup.sh: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "setup.sh: CUDA toolkit found; the CUDA target will be built"
else
  echo "setup.sh: no nvcc; the build will be CPU-only"
fi
