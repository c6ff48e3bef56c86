#!/usr/bin/env bash
# Packs what bench/gpu/run.sh needs into .gpu-prebuilt/ (git-ignored) for a device machine that
# has CUDA, cuBLAS and NCCL but not kvgate's other libraries (abseil, gRPC, ICU, cpp-httplib):
# the stripped binaries from ./build (configure it with -DKVGATE_CUDA_ARCHS covering the GPU's
# architecture) and every shared library they load except glibc, libstdc++/libgcc, libgomp and
# the CUDA libraries and OpenSSL 3, plus copies of the golden test's two models, as .gpu-prebuilt.tar.xz (about
# 18 MB; the device call's carry takes 64 MiB). run.sh unpacks it and skips its build step.
#
#   cmake --build build --target kvgate device_bench attention_decode_bench cuda_ops_test \
#     cuda_scoring_test cuda_backend_test golden_test nccl_transport_test
#   bash bench/gpu/pack.sh   # then carry .gpu-prebuilt.tar.xz to the device machine
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=$(mktemp -d)/.gpu-prebuilt
trap 'rm -rf "$(dirname "$OUT")"' EXIT
rm -rf "$OUT" && mkdir -p "$OUT/bin" "$OUT/lib" "$OUT/models"
BINS=(build/cli/kvgate build/bench/device_bench build/bench/gpu/attention_decode_bench
      build/tests/unit/kernels/cuda_ops_test build/tests/unit/kernels/cuda_scoring_test
      build/tests/unit/kernels/cuda_backend_test build/tests/unit/model/golden_test)
[ -x build/tests/unit/worker/nccl_transport_test ] &&
  BINS+=(build/tests/unit/worker/nccl_transport_test)
for b in "${BINS[@]}"; do
  [ -x "$b" ] || { echo "missing $b: build it first" >&2; exit 1; }
  strip -o "$OUT/bin/$(basename "$b")" "$b"
done
SKIP='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|libpthread\.|librt\.|libstdc\+\+|libgcc_s|libgomp|libcuda|libcudart|libcublas|libnccl|libssl|libcrypto)'
ldd "${BINS[@]}" | awk '/=>/ {print $1, $3}' | sort -u | while read -r name path; do
  [[ "$name" =~ $SKIP ]] && continue
  cp -L "$path" "$OUT/lib/$name"
done
strip --strip-unneeded "$OUT"/lib/*.so* 2>/dev/null || true
for m in stories260K babyllama-tok105; do  # the golden test's models
  cp -r "../shared/models/$m" "$OUT/models/$m"
done
tar -C "$(dirname "$OUT")" -cJf .gpu-prebuilt.tar.xz .gpu-prebuilt
ls -la .gpu-prebuilt.tar.xz
