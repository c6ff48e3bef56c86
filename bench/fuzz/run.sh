#!/usr/bin/env bash
# kvgate's libFuzzer harnesses (fuzz/): builds them with clang (ASan + UBSan), makes each seed
# corpus from the test fixtures, and runs every harness, then prints a table of executions,
# speed and coverage. A crash stops with the reproducer's path (fuzz/crashes/<harness>/ holds
# every one; turn each into a regression test under tests/).
#
#   bash bench/fuzz/run.sh                 # each harness for 10 million executions
#   RUNS=-1 SECONDS_EACH=30 bash bench/fuzz/run.sh  # each for 30 s (what CI runs)
#   FUZZERS="config_fuzzer request_fuzzer" bash bench/fuzz/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-10000000}
SECONDS_EACH=${SECONDS_EACH:-0}
BUILD=${BUILD:-build-fuzz}
ALL="safetensors_fuzzer safetensors_index_fuzzer config_fuzzer tokenizer_json_fuzzer
  tokenizer_model_fuzzer eviction_weights_fuzzer request_fuzzer"
FUZZERS=${FUZZERS:-$ALL}
command -v clang++ >/dev/null || { echo "fuzz: clang++ is missing (apt-get install clang)" >&2; exit 1; }

if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
    -DKVGATE_ENABLE_CUDA=OFF -DKVGATE_BUILD_TESTS=OFF -DKVGATE_BUILD_BENCH=OFF \
    -DKVGATE_SANITIZE=address,undefined -DKVGATE_FUZZ=ON >/dev/null
fi
cmake --build "$BUILD" --target fuzzers

# Seed corpora from the fixtures (copied, so the fuzzer's additions stay out of tests/).
CORPUS=$BUILD/corpus
rm -rf "$CORPUS"
mkdir -p "$CORPUS"
copy() {  # copy NAME FILE...
  local name=$1
  shift
  mkdir -p "$CORPUS/$name"
  local i=0
  for f in "$@"; do
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -le 1048576 ]; then
      cp "$f" "$CORPUS/$name/seed$i"
      i=$((i + 1))
    fi
  done
}
copy safetensors_fuzzer tests/testdata/eviction/*.safetensors tests/testdata/hf_models/*/*.safetensors
copy safetensors_index_fuzzer tests/testdata/hf_models/*/model.safetensors.index.json
copy config_fuzzer tests/testdata/hf_models/*/config.json models/*/config.json ../shared/models/*/config.json
copy tokenizer_json_fuzzer tests/testdata/tokenizer/*/tokenizer.json models/*/tokenizer.json
copy tokenizer_model_fuzzer ../shared/models/*/tokenizer.model tests/testdata/tokenizer/*/tokenizer.model
copy eviction_weights_fuzzer tests/testdata/eviction/*.safetensors models/stories260K-eviction/*.safetensors
mkdir -p "$CORPUS/request_fuzzer"
i=0
while IFS= read -r text; do
  printf '%s\n' "$text" | protoc -Iproto --encode=kvgate.v1.GenerateRequest kvgate/v1/kvgate.proto \
    > "$CORPUS/request_fuzzer/seed$i"
  i=$((i + 1))
done <<'REQUESTS'
text: "And God said" max_tokens: 16
token_ids { ids: [0, 25, 30] } max_tokens: 4 stop: "\n" stop_token_ids: 2
text: "x" sampling { temperature: 0.7 top_k: 20 top_p: 0.9 min_p: 0.05 seed: 7 } kv { policy: "h2o" budget: 64 chunk: 16 }
text: "x" kv { policy: "locret" budget: 64 stabilizers: 8 protected_tail: 4 weights_name: "locret" }
text: "x" kv { policy: "snapkv" budget: 32 window: 8 position: "reassign" } request_id: "job-7" ignore_eos: true prefill_chunk: 4
text: "x" kv { policy: "attention-gate" budget: 16 }
text: "x" kv { policy: "streaming" budget: 16 sinks: 4 }
REQUESTS

mkdir -p fuzz/crashes
printf '%-26s %12s %10s %8s %8s  %s\n' harness executions exec/s cov ft result
for f in $FUZZERS; do
  mkdir -p "fuzz/crashes/$f"
  args=(-runs="$RUNS" -max_len=65536 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1
        -artifact_prefix="fuzz/crashes/$f/")
  [ "$SECONDS_EACH" != 0 ] && args+=(-max_total_time="$SECONDS_EACH")
  log=$BUILD/$f.log
  set +e
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$BUILD/fuzz/$f" "${args[@]}" "$CORPUS/$f" > "$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo 0)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo 0)
  result=ok
  if [ $rc -ne 0 ]; then
    result="CRASH (see $log; reproducer in fuzz/crashes/$f/)"
  fi
  printf '%-26s %12s %10s %8s %8s  %s\n' "$f" "$execs" "$speed" "$cov" "$ft" "$result"
  if [ $rc -ne 0 ]; then
    grep -m5 -E 'ERROR|SUMMARY|runtime error' "$log" >&2 || true
    exit 1
  fi
done
