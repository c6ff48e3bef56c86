#!/usr/bin/env bash
# The serving benchmark in one run: builds, starts `kvgate serve` with 1 and then 2 stages on
# this machine's cores (1 stage: one worker with every core; 2 stages: one worker per half),
# loads each with bench/serving/serving_bench at 1 to 64 concurrent streams, and prints the
# tables, the 2-stage / 1-stage throughput ratio at the highest concurrency, and where the time
# went (each stage's busy share of the wall time, from `kvgate budget show`). Then 2 stages once
# more with TLS on every plane (mutual on the cluster, worker and data planes; certificates from
# scripts/make_certs.sh) and the TLS / plaintext throughput ratio: what encryption costs.
#
#   bash bench/serving/run.sh [MODEL_DIR] [TOKENS_PER_STREAM]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-models/kvgate-default}
TOKENS=${2:-64}
LEVELS=${LEVELS:-1,2,4,8,16,32,64}
ROUNDS=${ROUNDS:-3}
CORES=$(nproc)
cmake --build build --target kvgate serving_bench >/dev/null
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"; [[ -n "${SERVER:-}" ]] && kill "$SERVER" 2>/dev/null || true' EXIT

bash scripts/make_certs.sh "$OUT/certs" >/dev/null
for RUN in 1 2 2tls; do
  STAGES=${RUN%tls}
  THREADS=$(( CORES / STAGES > 0 ? CORES / STAGES : 1 ))
  TLS_SERVE=() TLS_CLIENT=()
  if [[ $RUN == *tls ]]; then
    TLS_SERVE=(--tls-cert "$OUT/certs/node.pem" --tls-key "$OUT/certs/node.key" --tls-ca "$OUT/certs/ca.pem")
    TLS_CLIENT=(--tls-ca "$OUT/certs/ca.pem")
  fi
  ./build/cli/kvgate serve --model "$MODEL" --port 0 --stages "$STAGES" --threads "$THREADS" \
    --max-batch 64 "${TLS_SERVE[@]}" 2> "$OUT/serve$RUN.log" &
  SERVER=$!
  for _ in $(seq 600); do
    grep -q "serving" "$OUT/serve$RUN.log" && break
    sleep 0.1
  done
  ADDR=127.0.0.1:$(grep -o "serving .* on 127.0.0.1:[0-9]*" "$OUT/serve$RUN.log" | grep -o "[0-9]*$")
  ADMIN=127.0.0.1:$(grep -o "admin 127.0.0.1:[0-9]*" "$OUT/serve$RUN.log" | grep -o "[0-9]*$")
  echo "== $STAGES stage(s), $THREADS thread(s) per worker, $MODEL, $TOKENS tokens per stream${TLS_SERVE:+, TLS (mutual inside the cluster)}"
  T0=$(date +%s.%N)
  ./build/bench/serving_bench --server "$ADDR" "${TLS_CLIENT[@]}" --concurrency "$LEVELS" --tokens "$TOKENS" \
    --rounds "$ROUNDS" --json > "$OUT/bench$RUN.json"
  T1=$(date +%s.%N)
  ./build/cli/kvgate budget show --server "$ADMIN" "${TLS_CLIENT[@]}" --json > "$OUT/budget$RUN.json"
  python3 - "$OUT/bench$RUN.json" "$OUT/budget$RUN.json" "$T0" "$T1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'conc':>6} {'tokens':>8} {'tok/s':>10} {'ttft p50':>10} {'ttft p99':>10} {'tpot p50':>10} {'tpot p99':>10}  (ms)")
for r in rows:
    print(f"{r['concurrency']:>6} {r['tokens']:>8} {r['tokens_per_s']:>10.1f} {r['ttft_ms_p50']:>10.2f} "
          f"{r['ttft_ms_p99']:>10.2f} {r['tpot_ms_p50']:>10.3f} {r['tpot_ms_p99']:>10.3f}")
wall = float(sys.argv[4]) - float(sys.argv[3])
b = json.load(open(sys.argv[2]))
for n in b["nodes"]:
    steps = max(n["steps"], 1)
    print(f"stage {n['stage']} layers {n['layers'][0]}-{n['layers'][1]}: busy {n['busy_seconds']:.2f} s "
          f"of {wall:.2f} s wall ({100 * n['busy_seconds'] / wall:.0f}%), {n['steps']} steps, "
          f"{1e3 * n['busy_seconds'] / steps:.2f} ms compute per step")
PY
  kill -INT "$SERVER"
  wait "$SERVER" || true
  SERVER=
done
python3 - "$OUT/bench1.json" "$OUT/bench2.json" "$OUT/bench2tls.json" <<'PY'
import json, sys
one = [json.loads(l) for l in open(sys.argv[1])]
two = [json.loads(l) for l in open(sys.argv[2])]
tls = [json.loads(l) for l in open(sys.argv[3])]
print("== 2-stage / 1-stage throughput")
for a, b in zip(one, two):
    print(f"concurrency {a['concurrency']:>3}: {b['tokens_per_s'] / a['tokens_per_s']:.2f}")
print(f"at the highest concurrency ({one[-1]['concurrency']}): "
      f"{two[-1]['tokens_per_s'] / one[-1]['tokens_per_s']:.2f} (target >= 0.9)")
print("== 2 stages: TLS / plaintext throughput (the cost of encrypting every plane)")
for a, b in zip(two, tls):
    print(f"concurrency {a['concurrency']:>3}: {b['tokens_per_s'] / a['tokens_per_s']:.2f}")
PY
