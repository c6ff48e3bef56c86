#!/usr/bin/env bash
# The GPU benchmarks in one run, on a machine with an NVIDIA GPU and nvcc: builds, checks (the
# GPU parity tests, ctest label gpu) and times, printing tables:
#   1. the HBM roofline of this run: a 1 GiB device-to-device copy;
#   2. kvgate's decode attention kernel at 4K / 32K / 128K tokens against that roofline
#      (build/bench/gpu/attention_decode_bench; target >= 80%);
#   3. PyTorch's scaled_dot_product_attention on the same shapes (bench/gpu/sdpa_bench.py), when
#      PyTorch with CUDA is installed.
# Not measured yet (the engine does not run end to end on the GPU; see docs/cuda_backend.md):
# decode tokens/s of a synthetic Llama-3.1-8B in bf16 at batch 1, 8 and 32 against the roofline,
# and 32K / 128K prompts with locret at a 4096 budget against full.
#
#   bash bench/gpu/run.sh [ITERS]
set -euo pipefail
cd "$(dirname "$0")/../.."
ITERS=${1:-50}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cmake --preset release >/dev/null
cmake --build build --target attention_decode_bench cuda_ops_test cuda_scoring_test >/dev/null
cmake --build build --target nccl_transport_test >/dev/null 2>&1 || echo "(no NCCL: transport test not built)"
echo "== checks: GPU parity tests"
(cd build && ctest -L gpu --output-on-failure | tail -3)
echo
echo "== kvgate decode attention"
./build/bench/gpu/attention_decode_bench --iters "$ITERS"
echo
echo "== PyTorch scaled_dot_product_attention, same shapes"
python3 bench/gpu/sdpa_bench.py --iters "$ITERS"
