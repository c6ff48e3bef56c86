#!/usr/bin/env bash
# Everything a machine with one NVIDIA GPU checks and measures, in one run of at most ~8
# minutes; the log goes to docs/gpu/<gpu>-<date>.log (and stdout).
#   1. builds only what the GPU run needs, for this GPU's architecture, with all cores;
#   2. ctest -L gpu: the CUDA op parity tests, the scoring kernels, the CUDA backend against the
#      CPU backend (KV ops; generation on the default model for every policy: same greedy tokens
#      and evicted counts), the NCCL self send/receive (when NCCL is installed);
#   3. end to end on the GPU: stories260K's golden greedy tokens and logits (the golden test run
#      with KVGATE_DEVICE=cuda:0), `kvgate generate --device cuda` against `--device cpu` for
#      every policy, and a 2-stage `kvgate serve --device cuda` on this one GPU against local
#      generation;
#   4. benchmarks: the decode attention kernel against the copy roofline, synthetic
#      Llama-3.1-8B bf16 decode tokens/s at batch 1, 8 and 32 against the copy roofline of the
#      same run, and 32K / 128K-token prompts with locret at budget 4096 against full (full only
#      to 32K: its float32 prefill attention at 128K alone takes minutes).
# Needs ../shared/models/stories260K or a copy at .gpu-models/stories260K (the device machine
# does not see ../shared).
#
#   bash bench/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p docs/gpu
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' )
LOG="docs/gpu/${GPU:-gpu}-$(date -u +%Y%m%d-%H%M).log"
exec > >(tee "$LOG") 2>&1
T0=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - T0 )) s)"; }
nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv,noheader
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
STORIES=../shared/models/stories260K
[ -d "$STORIES" ] || STORIES=.gpu-models/stories260K
if [ -d "$STORIES" ] && [ ! -e ../shared/models/stories260K ]; then
  mkdir -p ../shared/models 2>/dev/null && ln -sfn "$PWD/$STORIES" ../shared/models/stories260K
fi

if [ -f .gpu-prebuilt.tar.xz ]; then
  # Prebuilt by bench/gpu/pack.sh on a machine with kvgate's libraries (the device machine may
  # lack abseil and gRPC): unpack, and load its libraries before the system's.
  step "prebuilt binaries from .gpu-prebuilt.tar.xz (bench/gpu/pack.sh)"
  rm -rf .gpu-prebuilt && tar -xJf .gpu-prebuilt.tar.xz || exit 1
  export LD_LIBRARY_PATH="$PWD/.gpu-prebuilt/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  BIN=.gpu-prebuilt/bin
  for m in stories260K babyllama-tok105; do
    if [ ! -e "../shared/models/$m" ]; then
      mkdir -p ../shared/models && ln -sfn "$PWD/.gpu-prebuilt/models/$m" "../shared/models/$m"
    fi
  done
  step "GPU tests (the binaries ctest -L gpu runs)"
  for t in cuda_ops_test cuda_scoring_test cuda_backend_test nccl_transport_test; do
    [ -x "$BIN/$t" ] || { echo "$t: not packed"; continue; }
    "$BIN/$t" 2>&1 | grep -E '^\[  (PASSED|FAILED|SKIPPED) ' | sed "s/^/$t: /"
  done
else
  step "build (sm_${CAP}, $(nproc) cores)"
  cmake --preset release -DKVGATE_CUDA_ARCHS="${CAP}" -DKVGATE_BUILD_TESTS=ON >/dev/null || exit 1
  cmake --build build -j "$(nproc)" --target kvgate device_bench attention_decode_bench \
    cuda_ops_test cuda_scoring_test cuda_backend_test golden_test 2>&1 | tail -2
  cmake --build build -j "$(nproc)" --target nccl_transport_test >/dev/null 2>&1 ||
    echo "(no NCCL: transport test not built)"
  BIN=
  step "ctest -L gpu"
  (cd build && ctest -L gpu --output-on-failure 2>&1 | tail -15)
fi
bin() { if [ -n "$BIN" ]; then echo "$BIN/$(basename "$1")"; else echo "$1"; fi; }
K=$(bin ./build/cli/kvgate)

step "stories260K golden output on the GPU (golden_test with KVGATE_DEVICE=cuda:0)"
KVGATE_DEVICE=cuda:0 "$(bin ./build/tests/unit/model/golden_test)" 2>&1 |
  grep -E '^\[  (PASSED|FAILED|SKIPPED|     OK) |Failure|failed'

step "kvgate generate: --device cuda vs --device cpu, every policy (default model, f32 KV)"
M=models/kvgate-default
P="$(python3 -c "print(' '.join(['And God said, Let there be light: and there was light.']*40))")"
for pol in full streaming h2o snapkv tova locret attention-gate; do
  extra=()
  [ "$pol" != full ] && extra=(--kv-budget 128 --kv-chunk 64)
  [ "$pol" = locret ] && extra+=(--kv-weights "$M/locret.safetensors")
  [ "$pol" = attention-gate ] && extra+=(--kv-weights "$M/attention_gate.safetensors")
  for dev in cpu cuda:0; do
    $K generate --model $M --prompt "$P" --max-tokens 48 --temperature 0 --json --kv-dtype f32 \
      --kv-policy $pol "${extra[@]}" --device $dev > "/tmp/gen-$pol-$dev.json" 2>/dev/null
  done
  python3 - "$pol" <<'PY'
import json, sys
pol = sys.argv[1]
a = json.load(open(f"/tmp/gen-{pol}-cpu.json")); b = json.load(open(f"/tmp/gen-{pol}-cuda:0.json"))
ta, tb = a["token_ids"], b["token_ids"]
first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
same = first is None and len(ta) == len(tb)
print(f"{pol:15s} tokens {'same' if same else f'differ from step {first}'}; evicted cpu "
      f"{a['kv']['evicted_tokens']} cuda {b['kv']['evicted_tokens']}; decode tok/s cpu "
      f"{a['decode_tokens_per_s']:.0f} cuda {b['decode_tokens_per_s']:.0f}")
PY
done

step "2-stage kvgate serve --device cuda on one GPU vs local generation"
$K serve --model $M --stages 2 --device cuda --kv-dtype f32 --memory-limit 2G --port 50151 &
SERVE=$!
$K generate --model $M --prompt "And God said" --max-tokens 64 --temperature 0 --json \
  --device cpu > /tmp/local.json 2>/dev/null
$K generate --server 127.0.0.1:50151 --wait 120 --prompt "And God said" --max-tokens 64 \
  --temperature 0 --json > /tmp/served.json
kill $SERVE; wait $SERVE 2>/dev/null
python3 -c "
import json; a=json.load(open('/tmp/local.json')); b=json.load(open('/tmp/served.json'))
print('served over 2 GPU stages equals local:', a['token_ids']==b['token_ids'], b['kv'].get('stages'))"

step "decode attention kernel vs copy roofline"
"$(bin ./build/bench/gpu/attention_decode_bench)" --iters 50 2>&1 | tail -12

step "synthetic Llama-3.1-8B bf16: decode at batch 1, 8, 32; 32K and 128K prompts, locret vs full"
timeout 300 "$(bin ./build/bench/device_bench)" --device cuda:0 --synthetic llama-3.1-8b --dtype bf16 \
  --batch 1,8,32 --long 32768,128000 --kv-policy locret --kv-budget 4096

step "done"
echo "log: $LOG"
