#!/usr/bin/env bash
# The soak: `kvgate serve --stages 2` under STREAMS concurrent streams for DURATION seconds (each stream
# starts its next request as the last ends; a tenth are cancelled by the client mid-stream),
# with one worker killed halfway and a new one started in its place. Prints what the client
# saw (requests, completions, cancellations, failures by code and when, p50/p99 time to first
# token and inter-token latency) and the resident memory of the coordinator and the workers at
# the start, at the peak and at the end. Fails when a request failed other than as the restart
# explains (UNAVAILABLE between the kill and a second after serving resumed), when a process
# died that was not killed, or when memory at the end is more than 10% over the start.
#
#   bash bench/serving/soak.sh                        # 1000 streams, 10 minutes
#   KVGATE=build-asan/cli/kvgate STREAMS=200 DURATION=60 bash bench/serving/soak.sh   # CI's
#
# KVGATE: the kvgate binary (a sanitizer build works); the client is build/bench/soak_client.
set -euo pipefail
cd "$(dirname "$0")/../.."
STREAMS=${STREAMS:-1000}
SECONDS_TOTAL=${DURATION:-600}
MODEL=${MODEL:-models/kvgate-default}
KVGATE=${KVGATE:-build/cli/kvgate}
CLIENT=${CLIENT:-build/bench/soak_client}
MAX_BATCH=${MAX_BATCH:-64}
if [[ $KVGATE == build/* ]]; then cmake --build build --target kvgate >/dev/null; fi
cmake --build build --target soak_client >/dev/null
OUT=$(mktemp -d)
SERVER="" REPLACEMENT="" SAMPLER=""
cleanup() {
  local rc=$?
  for p in $SAMPLER $REPLACEMENT $SERVER; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $rc != 0 ]]; then  # what the server said, for whoever reads a failed run
    for f in serve replacement; do
      [[ -s $OUT/$f.log ]] && { echo "-- last lines of $f.log"; tail -n 40 "$OUT/$f.log"; }
    done
  fi
  rm -rf "$OUT"
}
trap cleanup EXIT
umask 077
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$OUT/token"
THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))

"$KVGATE" serve --model "$MODEL" --port 0 --stages 2 --threads "$THREADS" --max-batch "$MAX_BATCH" \
  --cluster-token-file "$OUT/token" 2> "$OUT/serve.log" &
SERVER=$!
for _ in $(seq 1200); do
  grep -q "kvgate: serving" "$OUT/serve.log" && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/serve.log" >&2; exit 1; }
  sleep 0.1
done
ADDR=127.0.0.1:$(grep -o "serving .* on 127.0.0.1:[0-9]*" "$OUT/serve.log" | grep -o "[0-9]*$")
ADMIN=127.0.0.1:$(grep -o "admin 127.0.0.1:[0-9]*" "$OUT/serve.log" | grep -o "[0-9]*$")
CLUSTER=127.0.0.1:$(grep -o "cluster 127.0.0.1:[0-9]*" "$OUT/serve.log" | grep -o "[0-9]*$")
budget() { "$KVGATE" budget show --server "$ADMIN" --json; }
worker_pids() { budget | python3 -c 'import json,sys; print(" ".join(str(n["pid"]) for n in json.load(sys.stdin)["nodes"] if n.get("pid")))'; }
echo "== soak: $STREAMS streams for $SECONDS_TOTAL s, 2 stages, $MODEL, $KVGATE (--max-batch $MAX_BATCH)"

# Resident memory, once a second: "t role pid kB" lines.
T0=$(date +%s.%N)
(
  while true; do
    t=$(python3 -c "import time; print(f'{time.time() - $T0:.1f}')")
    echo "$t coordinator $SERVER $(awk '/VmRSS/ {print $2}' /proc/$SERVER/status 2>/dev/null || echo 0)"
    for p in $(worker_pids 2>/dev/null); do
      echo "$t worker $p $(awk '/VmRSS/ {print $2}' /proc/$p/status 2>/dev/null || echo 0)"
    done
    sleep 1
  done
) > "$OUT/rss.log" 2>/dev/null &
SAMPLER=$!

"$CLIENT" --server "$ADDR" --streams "$STREAMS" --seconds "$SECONDS_TOTAL" > "$OUT/client.json" &
CLIENT_PID=$!

# Halfway: the second stage's worker is killed; a new one takes its place.
sleep "$(python3 -c "print($SECONDS_TOTAL / 2)")"
VICTIM=$(worker_pids | awk '{print $2}')
KILL_AT=$(python3 -c "import time; print(time.time() - $T0)")
kill -9 "$VICTIM"
"$KVGATE" worker --coordinator "$CLUSTER" --cluster-token-file "$OUT/token" --threads "$THREADS" \
  2> "$OUT/replacement.log" &
REPLACEMENT=$!
# Serving again: ready, on a pipeline without the killed worker (a poll right after the kill
# could still see the old pipeline as ready).
for _ in $(seq 600); do
  budget 2>/dev/null | python3 -c '
import json, sys
b = json.load(sys.stdin)
sys.exit(0 if b["ready"] and all(str(n.get("pid")) != sys.argv[1] for n in b["nodes"]) else 1)
' "$VICTIM" && break
  sleep 0.1
done
READY_AT=$(python3 -c "import time; print(time.time() - $T0)")
echo "worker pid $VICTIM killed at $(printf %.1f "$KILL_AT") s; serving again at $(printf %.1f "$READY_AT") s"

wait "$CLIENT_PID"
CLIENT_END=$(python3 -c "import time; print(time.time() - $T0)")
sleep 3  # idle: what the processes hold once the load is gone
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
SAMPLER=""
ALIVE=1
kill -0 "$SERVER" 2>/dev/null || ALIVE=0

SANITIZED=0
ldd "$KVGATE" 2>/dev/null | grep -q libasan && SANITIZED=1
python3 - "$OUT/client.json" "$OUT/rss.log" "$KILL_AT" "$READY_AT" "$CLIENT_END" "$ALIVE" "$VICTIM" "$SANITIZED" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
kill_at, ready_at, client_end = map(float, sys.argv[3:6])
alive, victim, sanitized = sys.argv[6] == "1", sys.argv[7], sys.argv[8] == "1"
# UNAVAILABLE (14) from the kill to a second after serving resumed is the restart's doing.
explained, unexplained = 0, {}
for code, times in c["failures"].items():
    for t in times:
        if code == "14" and kill_at - 0.5 <= t <= ready_at + 1.0:
            explained += 1
        else:
            unexplained[code] = unexplained.get(code, 0) + 1
print(f"requests {c['requests']}: completed {c['completed']}, cancelled by the client "
      f"{c['cancelled']}, failed {sum(len(t) for t in c['failures'].values())} "
      f"({explained} explained by the restart); {c['tokens']} tokens in {c['seconds']:.0f} s "
      f"({c['tokens'] / max(c['seconds'], 1e-9):.0f} tokens/s)")
print(f"time to first token p50 {c['ttft_ms_p50']:.1f} ms, p99 {c['ttft_ms_p99']:.1f} ms; "
      f"inter-token latency p50 {c['itl_ms_p50']:.2f} ms, p99 {c['itl_ms_p99']:.2f} ms")
for code, msgs in c["messages"].items():
    print(f"  failures with code {code}: e.g. {msgs[0][:160]}")
# Memory: per role, the first sample with the load on, the peak, the last (idle) one.
rows = [l.split() for l in open(sys.argv[2]) if len(l.split()) == 4]
by = {}
for t, role, pid, kb in rows:
    if int(kb) > 0:
        by.setdefault((role, pid), []).append((float(t), int(kb)))
print(f"{'process':<24} {'start MB':>9} {'peak MB':>9} {'end MB':>9}")
grew = []
for (role, pid), s in sorted(by.items()):
    start, peak, end = s[0][1], max(k for _, k in s), s[-1][1]
    ended = s[-1][0] >= client_end
    label = f"{role} {pid}" + (" (killed)" if pid == victim else "")
    print(f"{label:<24} {start / 1024:>9.1f} {peak / 1024:>9.1f} {end / 1024:>9.1f}")
    # A process that ran from the start to the end gives back what the load made it hold.
    if pid != victim and ended and s[0][0] < kill_at and end > start * 1.10 + 4096:
        grew.append(label)
bad = []
if unexplained:
    bad.append(f"failures the restart does not explain: {unexplained}")
if not alive:
    bad.append("the server died")
if grew and sanitized:
    print("memory not judged: under AddressSanitizer RSS does not show what a process holds "
          "(freed memory waits in its quarantine)")
elif grew:
    bad.append(f"memory at the end more than 10% over the start: {grew}")
if c["completed"] == 0:
    bad.append("nothing completed")
if bad:
    print("SOAK FAILED: " + "; ".join(bad))
    sys.exit(1)
print("soak ok")
PY
