#!/usr/bin/env bash
# kvgate's CPU engine beside llama.cpp on this machine, in one command.
#
# 1. llama.cpp's source from PyPI's llama-cpp-python sdist (vendor/llama.cpp), built CPU-only
#    with -march=native under build/peers/ (nothing of it is committed).
# 2. A venv with llama.cpp's converter requirements (requirements-convert_hf_to_gguf.txt).
# 3. The same weights for both engines: the default model (f32) and a TinyLlama-1.1B-shaped
#    checkpoint with random bf16 weights (bench/peers/make_random_llama.py, Llama 2 tokenizer
#    from ../shared), converted with llama.cpp's convert_hf_to_gguf.py; Q8_0 and Q4_0 made by
#    llama-quantize with the embedding and output matrices left in the stored dtype, as kvgate's
#    --quantize does (so both engines read the same bytes per token).
# 4. ROUNDS interleaved rounds per configuration of kvgate's engine_bench (--json) and
#    llama-bench (-r 1), both at THREADS threads: prefill of 128 and 512 tokens, decode of 64
#    from an empty context (llama-bench's tg; engine_bench --decode-context 1). engine_bench
#    measures the copy bandwidth in each round.
# 5. Medians and kvgate / llama.cpp ratios (bench/peers/llama_cpp_report.py), and decode as a
#    fraction of the copy-bandwidth bound; the table also goes to build/peers/results/report.md.
#
#   bash bench/peers/llama_cpp.sh                  # everything: ~1 h on 2 cores, first run
#   MODELS=default ROUNDS=5 bash bench/peers/llama_cpp.sh
#
# Environment: THREADS (2), ROUNDS (3), MODELS ("default tinyllama"), FORMATS ("native q8_0
# q4_0"), SHARED (../shared), LLAMA_CPP_PYTHON (0.3.36), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
MODELS=${MODELS:-default tinyllama}
FORMATS=${FORMATS:-native q8_0 q4_0}
SHARED=${SHARED:-$ROOT/../shared}
VERSION=${LLAMA_CPP_PYTHON:-0.3.36}
PYTHON=${PYTHON:-python3}
PEERS=$ROOT/build/peers
SRC=$PEERS/llama-cpp-python-$VERSION/vendor/llama.cpp
LBUILD=$PEERS/llama.cpp-build
VENV=$PEERS/venv
GGUF=$PEERS/gguf
RESULTS=$PEERS/results
mkdir -p "$PEERS" "$GGUF"

step() { echo "== $(date +%H:%M:%S) $*"; }

# ---- 1. llama.cpp ----
if [[ ! -f $SRC/CMakeLists.txt ]]; then
  step "llama-cpp-python $VERSION source distribution from PyPI"
  rm -rf "$PEERS/dl"
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" \
    -d "$PEERS/dl"
  tar xzf "$PEERS"/dl/llama_cpp_python-"$VERSION".tar.gz -C "$PEERS"
  mv "$PEERS/llama_cpp_python-$VERSION" "$PEERS/llama-cpp-python-$VERSION"
fi
if [[ ! -x $LBUILD/bin/llama-bench || ! -x $LBUILD/bin/llama-quantize ]]; then
  step "building llama.cpp (CPU only, native ISA) in $LBUILD"
  cmake -S "$SRC" -B "$LBUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF >"$PEERS/cmake.log"
  cmake --build "$LBUILD" --target llama-bench llama-quantize -j "$(nproc)" >"$PEERS/build.log"
fi
LLAMA_BENCH=$LBUILD/bin/llama-bench
LLAMA_QUANTIZE=$LBUILD/bin/llama-quantize

# ---- 2. the converter's venv ----
if [[ ! -f $VENV/.complete ]]; then
  step "venv with llama.cpp's converter requirements in $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # --retries 0: where download.pytorch.org (the file's extra index) is unreachable, PyPI alone.
  "$VENV/bin/pip" install --quiet --retries 0 --timeout 20 \
    -r "$SRC/requirements/requirements-convert_hf_to_gguf.txt"
  touch "$VENV/.complete"
fi

# ---- 3. the same weights for both ----
cmake --build build --target engine_bench >/dev/null
declare -A HF NATIVE CONVERT
HF[default]=$ROOT/models/kvgate-default NATIVE[default]=f32
HF[tinyllama]=$PEERS/tinyllama-1.1b-random NATIVE[tinyllama]=bf16
if [[ " $MODELS " == *" tinyllama "* && ! -f ${HF[tinyllama]}/model.safetensors ]]; then
  step "TinyLlama-1.1B-shaped checkpoint with random bf16 weights"
  "$VENV/bin/python" bench/peers/make_random_llama.py "${HF[tinyllama]}" \
    --tokenizer "$SHARED/models/llama2-tokenizer"
fi
# What the converter reads: the default model's own weights and config, with a sentencepiece
# tokenizer (stories260K's 512 tokens, padded to the model's 2048 by the converter) because it
# refuses BPE tokenizers whose pre-tokenizer it does not know. Speed depends on the weights and
# the token count only; llama-bench feeds token ids.
CONVERT[default]=$PEERS/kvgate-default-convert
CONVERT[tinyllama]=${HF[tinyllama]}
if [[ " $MODELS " == *" default "* && ! -f ${CONVERT[default]}/tokenizer.model ]]; then
  mkdir -p "${CONVERT[default]}"
  for f in config.json generation_config.json model.safetensors; do
    ln -sf "${HF[default]}/$f" "${CONVERT[default]}/$f"
  done
  cp "$SHARED/models/stories260K/tokenizer.model" "${CONVERT[default]}/tokenizer.model"
fi
gguf_for() {  # MODEL FORMAT -> path of the GGUF file, converted or quantized on first use
  local model=$1 format=$2 native=${NATIVE[$1]}
  local base=$GGUF/$model-$native.gguf
  if [[ ! -f $base ]]; then
    step "convert_hf_to_gguf.py ${CONVERT[$model]} -> $base" >&2
    "$VENV/bin/python" "$SRC/convert_hf_to_gguf.py" "${CONVERT[$model]}" --outtype "$native" \
      --outfile "$base.partial" >"$GGUF/$model-convert.log" 2>&1 \
      || { tail -20 "$GGUF/$model-convert.log" >&2; exit 1; }
    mv "$base.partial" "$base"
  fi
  [[ $format == native ]] && { echo "$base"; return; }
  local out=$GGUF/$model-$format.gguf
  if [[ ! -f $out ]]; then
    step "llama-quantize $base -> $out (embedding and output left $native)" >&2
    "$LLAMA_QUANTIZE" --token-embedding-type "$native" --output-tensor-type "$native" \
      "$base" "$out.partial" "${format^^}" >"$GGUF/$model-$format.log" 2>&1 \
      || { tail -20 "$GGUF/$model-$format.log" >&2; exit 1; }
    mv "$out.partial" "$out"
  fi
  echo "$out"
}

# ---- 4. interleaved rounds ----
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
CONFIGS=()
for model in $MODELS; do
  for format in $FORMATS; do
    gguf_for "$model" "$format" >/dev/null
    CONFIGS+=("$model-$format")
  done
done
step "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores;" \
  "threads $THREADS; $ROUNDS rounds; llama.cpp from llama-cpp-python $VERSION"
NO_REPACK=()
for round in $(seq "$ROUNDS"); do
  for config in "${CONFIGS[@]}"; do
    model=${config%%-*} format=${config#*-}
    quant=()
    [[ $format != native ]] && quant=(--quantize "$format")
    step "round $round/$ROUNDS: $config"
    ./build/bench/engine_bench --json --threads "$THREADS" --model "${HF[$model]}" "${quant[@]}" \
      --prefill-tokens 128 512 --decode-tokens 64 --decode-context 1 \
      >"$RESULTS/kvgate-$config-$round.json"
    # llama.cpp's default for quantized weights repacks them for its AMX / interleaved kernels;
    # where that crashes (its AMX matmul segfaults on some Sapphire Rapids VMs), --repack 0.
    repack=()
    [[ " ${NO_REPACK[*]} " == *" $config "* ]] && repack=(--repack 0)
    if ! "$LLAMA_BENCH" -m "$(gguf_for "$model" "$format")" -t "$THREADS" -p 128,512 -n 64 -r 1 \
      "${repack[@]}" -o jsonl >"$RESULTS/llama-$config-$round.jsonl" \
      2>"$RESULTS/llama-$config-$round.log"; then
      [[ ${#repack[@]} -eq 0 ]] || { echo "llama-bench failed on $config" >&2; exit 1; }
      echo "llama-bench crashed on $config with its default --repack 1; again with --repack 0" >&2
      NO_REPACK+=("$config")
      "$LLAMA_BENCH" -m "$(gguf_for "$model" "$format")" -t "$THREADS" -p 128,512 -n 64 -r 1 \
        --repack 0 -o jsonl >"$RESULTS/llama-$config-$round.jsonl" \
        2>"$RESULTS/llama-$config-$round.log"
    fi
  done
done

# ---- 4b. engine_bench and `kvgate generate` measure the same thing ----
# Both run model::Generator; the same 128-token prompt and 64 greedy tokens through each.
cmake --build build --target kvgate >/dev/null
IDS=$("$PYTHON" -c "print(','.join(str((i * 7919 + 3) % 2048) for i in range(128)))")
for round in $(seq "$ROUNDS"); do
  ./build/bench/engine_bench --json --threads "$THREADS" --model "${HF[default]}" \
    --prefill-tokens 128 --decode-tokens 64 >"$RESULTS/agree-bench-$round.json"
  ./build/cli/kvgate generate --model "${HF[default]}" --threads "$THREADS" --prompt-ids "$IDS" \
    --max-tokens 65 --ignore-eos --temperature 0 --json >"$RESULTS/agree-generate-$round.json" \
    2>/dev/null
done

# ---- 5. report ----
LABELS=()
for config in "${CONFIGS[@]}"; do
  model=${config%%-*} format=${config#*-}
  [[ $format == native ]] && format=${NATIVE[$model]}
  case $model in
    default) LABELS+=("kvgate-default (3.67M)=$format=$config") ;;
    tinyllama) LABELS+=("TinyLlama-1.1B shape, random weights=$format=$config") ;;
  esac
done
{
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
    "flags: $(grep -m1 '^flags' /proc/cpuinfo | grep -o 'avx512[a-z_0-9]*\|avx2\|fma\|f16c\|avx_vnni' | sort -u | xargs)"
  echo "Threads: $THREADS each; medians of $ROUNDS interleaved rounds; llama.cpp from" \
    "llama-cpp-python $VERSION (vendor/llama.cpp, GGML_NATIVE=ON)."
  if [[ ${#NO_REPACK[@]} -gt 0 ]]; then
    echo "llama-bench ran with --repack 0 for ${NO_REPACK[*]}: with its default (--repack 1) it" \
      "crashed on this CPU."
  fi
  echo
  "$PYTHON" bench/peers/llama_cpp_report.py "$RESULTS" "${LABELS[@]}"
  echo
  "$PYTHON" - "$RESULTS" "$ROUNDS" <<'PY'
import json, pathlib, statistics, sys
d, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
pick = lambda p, k: json.loads(next(l for l in open(p) if l.startswith("{")))[k]
for what, key in (("prefill", "prefill_tokens_per_s"), ("decode", "decode_tokens_per_s")):
    bench = [pick(d / f"agree-bench-{r}.json", "prefill_tps" if what == "prefill" else "decode_tps")
             for r in range(1, n + 1)]
    bench = [b["128"] if isinstance(b, dict) else b for b in bench]
    gen = [pick(d / f"agree-generate-{r}.json", key) for r in range(1, n + 1)]
    print(f"kvgate-default, 128-token prompt, {what}: engine_bench {statistics.median(bench):.1f}"
          f" tok/s, kvgate generate {statistics.median(gen):.1f} tok/s (medians of {n})")
PY
} | tee "$RESULTS/report.md"
