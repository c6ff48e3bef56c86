#!/usr/bin/env bash
# HTTP against gRPC on the same server (issue 17): one `kvgate serve` with both front ends,
# loaded at 1, 16 and 64 concurrent streams by serving_bench (gRPC, C++) and by http_bench.py
# over server-sent events, with the official openai client and with a bare asyncio reader
# (http_bench.py --client raw: the server's cost without the client library's), alternately;
# prints the tables and the HTTP / gRPC throughput and TTFT ratios per level.
#
#   bash bench/serving/http_vs_grpc.sh [MODEL_DIR] [TOKENS_PER_STREAM]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-models/kvgate-default}
TOKENS=${2:-64}
LEVELS=${LEVELS:-1,16,64}
ROUNDS=${ROUNDS:-3}
PY=${PYTHON:-.venv/bin/python}
cmake --build build --target kvgate serving_bench >/dev/null
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"; [[ -n "${SERVER:-}" ]] && kill "$SERVER" 2>/dev/null || true' EXIT
./build/cli/kvgate serve --model "$MODEL" --port 0 --http-port 0 --max-batch 64 2> "$OUT/serve.log" &
SERVER=$!
for _ in $(seq 600); do
  grep -q "serving" "$OUT/serve.log" && break
  sleep 0.1
done
ADDR=127.0.0.1:$(grep -o "serving .* on 127.0.0.1:[0-9]*" "$OUT/serve.log" | grep -o "[0-9]*$")
HTTP=$(grep -o "HTTP 127.0.0.1:[0-9]*" "$OUT/serve.log" | grep -o "127.0.0.1:[0-9]*")
VOCAB=$(./build/cli/kvgate info --server "$ADDR" | python3 -c 'import json,sys; print(json.load(sys.stdin)["model"]["vocab_size"])')
echo "== $MODEL, $TOKENS tokens per stream, $ROUNDS waves per level; gRPC $ADDR, HTTP $HTTP"
for LEVEL in ${LEVELS//,/ }; do
  ./build/bench/serving_bench --server "$ADDR" --concurrency "$LEVEL" --tokens "$TOKENS" \
    --rounds "$ROUNDS" --json >> "$OUT/grpc.json"
  for CLIENT in openai raw; do
    "$PY" bench/serving/http_bench.py --base "http://$HTTP/v1" --concurrency "$LEVEL" \
      --tokens "$TOKENS" --rounds "$ROUNDS" --vocab "$VOCAB" --client "$CLIENT" \
      >> "$OUT/http-$CLIENT.json"
  done
done
python3 - "$OUT/grpc.json" "$OUT/http-openai.json" "$OUT/http-raw.json" <<'PY'
import json, sys
g, h, raw = ([json.loads(l) for l in open(p)] for p in sys.argv[1:4])
print(f"{'front end':>22} {'conc':>5} {'tok/s':>9} {'ttft p50':>9} {'ttft p99':>9} {'tpot p50':>9} {'tpot p99':>9}  (ms)")
for name, rows in (("gRPC (C++ client)", g), ("HTTP (openai client)", h), ("HTTP (raw asyncio)", raw)):
    for r in rows:
        print(f"{name:>22} {r['concurrency']:>5} {r['tokens_per_s']:>9.1f} {r['ttft_ms_p50']:>9.2f} "
              f"{r['ttft_ms_p99']:>9.2f} {r['tpot_ms_p50']:>9.3f} {r['tpot_ms_p99']:>9.3f}")
print("HTTP / gRPC (openai client | raw reader):")
for a, b, c in zip(g, h, raw):
    print(f"  {a['concurrency']:>3} streams: throughput {b['tokens_per_s'] / a['tokens_per_s']:.2f}x | "
          f"{c['tokens_per_s'] / a['tokens_per_s']:.2f}x, TTFT p50 "
          f"{b['ttft_ms_p50'] / max(a['ttft_ms_p50'], 1e-9):.2f}x | "
          f"{c['ttft_ms_p50'] / max(a['ttft_ms_p50'], 1e-9):.2f}x")
PY
