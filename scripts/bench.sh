#!/usr/bin/env bash
# Measures room-allocator side by side with its references, interleaved, in
# one run on this machine (all traffic on 127.0.0.1), and prints the summary
# that BENCHMARKS.md records:
#   - AllocateRoom on the embedded store and on etcd, the ceiling server
#     (tonic + one AtomicU64 per worker), Redis INCRBY (redis-benchmark,
#     unpipelined and pipelined 16 deep) and an etcd compare-and-swap counter,
#     at concurrency 1, 16 and 64, REPS times in turn (median reported);
#   - LeaseRooms and the RoomClient lease path against Redis and a bare atomic;
#   - RSS of a server after 100 million rooms.
# Every load generator and server runs with one tokio worker thread.
# Usage: scripts/bench.sh   (DURATION=5 REPS=3 by default)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
REPS=${REPS:-3}
THREADS=1
OUT=target/bench
BIN=target/release/room-allocator
CEILING=target/release/examples/ceiling_server

for tool in etcd redis-server redis-benchmark python3; do
  command -v "$tool" >/dev/null || { echo "bench.sh needs $tool (apt-get install etcd-server redis-server)" >&2; exit 1; }
done
cargo build --release --locked --bin room-allocator --example ceiling_server
rm -rf "$OUT" && mkdir -p "$OUT"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
. scripts/ports.sh

ETCD_PORT=$(free_port); ETCD_PEER=$(free_port)
etcd --name bench --data-dir "$OUT/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER" --logger zap --log-level error 2>"$OUT/etcd.log" &
pids+=($!)
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
pids+=($!)
EMBEDDED_PORT=$(free_port); ON_ETCD_PORT=$(free_port); CEILING_PORT=$(free_port)
wait_port "$ETCD_PORT"
"$BIN" serve --listen "127.0.0.1:$EMBEDDED_PORT" --metrics-listen 127.0.0.1:0 --data-dir "$OUT/data" \
  --worker-threads "$THREADS" 2>"$OUT/embedded.log" &
pids+=($!)
"$BIN" serve --listen "127.0.0.1:$ON_ETCD_PORT" --metrics-listen 127.0.0.1:0 \
  --etcd-endpoints "http://127.0.0.1:$ETCD_PORT" --worker-threads "$THREADS" 2>"$OUT/on-etcd.log" &
pids+=($!)
"$CEILING" --listen "127.0.0.1:$CEILING_PORT" --worker-threads "$THREADS" 2>"$OUT/ceiling.log" &
pids+=($!)
for port in "$REDIS_PORT" "$EMBEDDED_PORT" "$ON_ETCD_PORT" "$CEILING_PORT"; do wait_port "$port"; done

record() { # label, then bench flags
  local label=$1; shift
  echo "== $label $*" >&2
  "$BIN" bench --worker-threads "$THREADS" --duration "$DURATION" "$@" 2>>"$OUT/bench.log" | tail -1 |
    LABEL=$label python3 -c 'import json, os, sys; d = json.load(sys.stdin); d["label"] = os.environ["LABEL"]; print(json.dumps(d))' \
    >>"$OUT/results.jsonl"
}
redis_incrby() { # concurrency, pipeline depth
  local requests=$(( $1 == 1 ? 100000 : 1000000 ))
  echo "== redis INCRBY -c $1 -P $2" >&2
  redis-benchmark -p "$REDIS_PORT" -c "$1" -P "$2" -n "$requests" --csv INCRBY room 1 |
    C=$1 P=$2 python3 -c '
import csv, json, os, sys
rows = [r for r in csv.reader(sys.stdin) if r and r[0].startswith("INCRBY")]
rps = float(rows[-1][1])
print(json.dumps({"label": "redis-incrby" + ("-pipelined" if os.environ["P"] != "1" else ""),
                  "concurrency": int(os.environ["C"]), "rooms_per_sec": rps * (1 if os.environ["P"] == "1" else 1)}))' \
    >>"$OUT/results.jsonl"
}

EMBEDDED="http://127.0.0.1:$EMBEDDED_PORT"
for rep in $(seq "$REPS"); do
  for c in 1 16 64; do
    record embedded --server "$EMBEDDED" --concurrency "$c"
    record etcd --server "http://127.0.0.1:$ON_ETCD_PORT" --concurrency "$c"
    record ceiling --server "http://127.0.0.1:$CEILING_PORT" --concurrency "$c"
    redis_incrby "$c" 1
  done
  for c in 1 16; do
    record etcd-cas --method etcd-cas --etcd-endpoints "http://127.0.0.1:$ETCD_PORT" --concurrency "$c"
  done
  record lease --server "$EMBEDDED" --method lease --concurrency 16
  redis_incrby 16 16
  record client --server "$EMBEDDED" --method client --concurrency 1
done

# Memory: 100 million rooms (100 LeaseRooms of 1,000,000) on a fresh server.
MEMORY_PORT=$(free_port)
"$BIN" serve --listen "127.0.0.1:$MEMORY_PORT" --metrics-listen 127.0.0.1:0 --data-dir "$OUT/memory-data" \
  --worker-threads "$THREADS" 2>"$OUT/memory.log" &
MEMORY_PID=$!
pids+=($MEMORY_PID)
wait_port "$MEMORY_PORT"
"$BIN" bench --server "http://127.0.0.1:$MEMORY_PORT" --method lease --lease-count 1000000 --requests 100 \
  --concurrency 1 --duration 120 2>>"$OUT/bench.log" | tail -1 >"$OUT/memory.json"
RSS_KB=$(awk '/VmRSS/ { print $2 }' "/proc/$MEMORY_PID/status")

# The in-process hot paths (criterion), same run.
cargo bench --locked --bench hot_path >"$OUT/criterion.log" 2>&1

RSS_KB=$RSS_KB OUT=$OUT python3 - <<'PY'
import json, os, statistics
out = os.environ["OUT"]
rows = [json.loads(line) for line in open(f"{out}/results.jsonl")]
def median(label, c, key="rooms_per_sec"):
    values = [r[key] for r in rows if r["label"] == label and r["concurrency"] == c and key in r]
    return statistics.median(values) if values else float("nan")
def criterion(name):
    path = f"target/criterion/hot_path/{name}/new/estimates.json"
    return json.load(open(path))["mean"]["point_estimate"]
print("| concurrency | embedded | on etcd | ceiling | embedded / ceiling | etcd / ceiling | p99 embedded / ceiling | Redis INCRBY | etcd CAS counter | etcd CAS / ceiling |")
print("|---|---|---|---|---|---|---|---|---|---|")
for c in (1, 16, 64):
    e, t, ceil, r = median("embedded", c), median("etcd", c), median("ceiling", c), median("redis-incrby", c)
    cas = median("etcd-cas", c)
    p99 = median("embedded", c, "p99_us") / median("ceiling", c, "p99_us")
    print(f"| {c} | {e:,.0f} | {t:,.0f} | {ceil:,.0f} | {e/ceil:.2f} | {t/ceil:.2f} | {p99:.2f} | {r:,.0f} | {cas:,.0f} | {cas/ceil:.3f} |")
lease = median("lease", 16)
redis16 = median("redis-incrby", 16)
pipelined = median("redis-incrby-pipelined", 16)
client = median("client", 1)
atomic_ns, client_ns, alloc_ns = criterion("bare_atomic_fetch_add"), criterion("client_try_allocate"), criterion("allocator_allocate")
print()
print(f"- LeaseRooms (1000 bases per call), concurrency 16: {lease:,.0f} rooms/s = {lease/redis16:.0f} x Redis INCRBY ({redis16:,.0f}/s), {lease/pipelined:.1f} x Redis pipelined 16 deep ({pipelined:,.0f}/s)")
print(f"- RoomClient through `bench --method client`, one caller, one thread: {client:,.0f} rooms/s = {client/redis16:.0f} x Redis INCRBY at 16")
print(f"- criterion: client try_allocate {client_ns:.1f} ns = {1e9/client_ns/1e6:.1f} M rooms/s; bare AtomicU64::fetch_add {atomic_ns:.2f} ns ({1e9/atomic_ns/1e6:.0f} M/s); client / atomic = {atomic_ns/client_ns:.3f}")
print(f"- criterion: allocator allocate (AllocateRoom's in-memory path, no RPC) {alloc_ns:.1f} ns")
memory = json.load(open(f"{out}/memory.json"))
print(f"- RSS after {memory['rooms']:,} rooms leased: {int(os.environ['RSS_KB'])/1024:.1f} MiB")
checks = sum(r.get("duplicates", 0) + r.get("misaligned", 0) for r in rows)
checked = sum(r.get("checked_rooms", 0) for r in rows)
print(f"- every run checked its rooms: {checked:,} rooms, {checks} duplicates or misaligned")
PY
