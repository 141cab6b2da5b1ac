#!/usr/bin/env bash
# Scale figures for BENCHMARKS.md ("The worker lifecycle at fleet scale"),
# all on 127.0.0.1 with the release binary:
#   - WORKERS (100,000) registered workers, each with rooms, on one embedded
#     server and on 3 etcd replicas: RSS, start-up (reopen) time, time to page
#     through ListWorkers;
#   - AllocateRoom spread over 10,000 workers against one worker, c=64,
#     REPS interleaved runs (median);
#   - 10,000 workers registering at once against 3 etcd replicas: errors;
#   - etcd writes (committed raft proposals) per million rooms at steady
#     state, against the etcd CAS counter's.
#   - embedded compaction (issue 20): RSS after a restart and its first
#     retention tick (nothing due: the log is not read), and AllocateRoom
#     while the server compacts every second (--retention 1s), with the
#     writer's longest pause per compaction from its log.
# Usage: scripts/scale.sh   (WORKERS=100000 REPS=3 DURATION=5)
#   ONLY=embedded runs the embedded part alone; BIN=path uses that binary
#   (not built) and OUT=dir writes there, e.g. to compare two builds.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS=${WORKERS:-100000}
REPS=${REPS:-3}
DURATION=${DURATION:-5}
ONLY=${ONLY:-}
OUT=${OUT:-target/scale}
tools="python3"
[ "$ONLY" = embedded ] || tools="etcd python3 curl"
for tool in $tools; do
  command -v "$tool" >/dev/null || { echo "scale.sh needs $tool" >&2; exit 1; }
done
if [ -z "${BIN:-}" ]; then
  BIN=target/release/room-allocator
  cargo build --release --locked --bin room-allocator
fi
rm -rf "$OUT" && mkdir -p "$OUT"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
. scripts/ports.sh
rss_mib() { awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.2f}')"; }
# Starts a server; sets SERVER_PID; returns once it listens.
start_server() { # port, log, then serve flags
  local port=$1 log=$2; shift 2
  "$BIN" serve --listen "127.0.0.1:$port" --metrics-listen 127.0.0.1:0 --max-workers 1000000 "$@" 2>"$log" &
  SERVER_PID=$!
  pids+=($SERVER_PID)
  wait_port "$port" 600
}
# Waits for a server to exit after SIGTERM.
stop_server() {
  kill -TERM "$1"
  for _ in $(seq 900); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  echo "server $1 did not stop" >&2; exit 1
}
bench() { "$BIN" bench "$@" 2>>"$OUT/bench.log" | tail -1; }
json() { python3 -c "import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
page_all() { # server url: seconds to page through every worker, and the count
  local started count
  started=$(now)
  count=$("$BIN" workers --server "$1" | wc -l)
  echo "$(since "$started") $count"
}
report() { echo "$*" | tee -a "$OUT/summary.txt"; }

# --- embedded -------------------------------------------------------------
PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
start_server "$PORT" "$OUT/embedded.log" --data-dir "$OUT/embedded"
EMBEDDED_PID=$SERVER_PID
started=$(now)
result=$(bench --server "$URL" --method register --requests "$WORKERS" --concurrency 64 --duration 900)
report "embedded: registered $WORKERS workers, one room each, in $(since "$started") s; errors $(json "$result" errors)"
report "embedded: RSS with $WORKERS workers: $(rss_mib "$EMBEDDED_PID") MiB"
read -r seconds count < <(page_all "$URL")
report "embedded: paging through ListWorkers ($count workers, 1000 a page): $seconds s"
started=$(now)
stop_server "$EMBEDDED_PID"
report "embedded: SIGTERM to exit with $WORKERS workers (counters persisted): $(since "$started") s"
started=$(now)
start_server "$PORT" "$OUT/embedded-restart.log" --data-dir "$OUT/embedded"
report "embedded: restart with $WORKERS workers, start to listening: $(since "$started") s; RSS $(rss_mib "$SERVER_PID") MiB"
EMBEDDED_PID=$SERVER_PID
# The first retention tick runs at start (24 h retention: nothing is due);
# it has surely ended 10 s later, even on a loaded machine.
sleep 10
report "embedded: RSS after the restart and its first retention tick: $(rss_mib "$EMBEDDED_PID") MiB; log bytes $(stat -c %s "$OUT/embedded/rooms.log")"

# AllocateRoom over 10,000 workers against over one, c=64, interleaved.
for rep in $(seq "$REPS"); do
  for workers in 1 10000; do
    r=$(bench --server "$URL" --method allocate --workers "$workers" --concurrency 64 --duration "$DURATION")
    echo "$workers $(json "$r" rooms_per_sec)" >>"$OUT/spread.txt"
  done
done
OUT=$OUT python3 - <<'PY' | tee -a "$OUT/summary.txt"
import os, statistics
rows = [line.split() for line in open(os.environ["OUT"] + "/spread.txt")]
one = [float(r) for w, r in rows if w == "1"]
many = [float(r) for w, r in rows if w == "10000"]
ratios = [m / o for o, m in zip(one, many)]
print(f"embedded: AllocateRoom c=64 over 10,000 workers {statistics.median(many):,.0f} rooms/s, over 1 worker "
      f"{statistics.median(one):,.0f} rooms/s: ratio {statistics.median(ratios):.2f} (median of the {len(ratios)} "
      f"interleaved pairs, 10,000 workers/1 worker: " + ", ".join(f"{m:,.0f}/{o:,.0f}" for o, m in zip(one, many)) + ")")
PY
stop_server "$EMBEDDED_PID"

# AllocateRoom while the server compacts: with --retention 1s every tick
# (one a second) finds ranges older than 2 s and rewrites the log, the
# WORKERS registrations included; the first one drops every range of the
# registrations. The bench starts once that first compaction is logged.
started=$(now)
start_server "$PORT" "$OUT/embedded-compacting.log" --data-dir "$OUT/embedded" --retention 1s
EMBEDDED_PID=$SERVER_PID
for _ in $(seq 1200); do grep -q 'compacted the embedded' "$OUT/embedded-compacting.log" && break; sleep 0.1; done
report "embedded: first compaction after a restart with --retention 1s logged $(since "$started") s after start; RSS $(rss_mib "$EMBEDDED_PID") MiB"
r=$(bench --server "$URL" --method allocate --workers 10000 --concurrency 64 --duration $((DURATION * 2)))
report "embedded: RSS after compacting every second for $((DURATION * 2)) s: $(rss_mib "$EMBEDDED_PID") MiB"
stop_server "$EMBEDDED_PID"
OUT=$OUT python3 - "$r" <<'PY' | tee -a "$OUT/summary.txt"
import json, os, re, sys
r = json.loads(sys.argv[1])
# Fields of the writer's log line, whichever build wrote it (older builds
# log no pauses).
lines = [l for l in open(os.environ["OUT"] + "/embedded-compacting.log") if "compacted the embedded" in l]
def field(line, name):
    m = re.search(name + r"=([0-9.]+)", line)
    return float(m.group(1)) if m else None
slices = [field(l, "longest_slice_ms") for l in lines]
switches = [field(l, "switch_ms") for l in lines]
totals = [field(l, "total_ms") for l in lines]
fmt = lambda xs: "n/a" if not xs or None in xs else f"max {max(xs):.1f} ms, median {sorted(xs)[len(xs) // 2]:.1f} ms"
print(f"embedded: AllocateRoom c=64 over 10,000 workers while compacting every second: p99 {r['p99_us'] / 1000:.2f} ms, "
      f"p99.9 {r['p999_us'] / 1000:.2f} ms, p50 {r['p50_us'] / 1000:.2f} ms, {r['rooms_per_sec']:,.0f} rooms/s, errors {r['errors']}, "
      f"duplicates {r['duplicates']}, misaligned {r['misaligned']} ({r['checked_rooms']} rooms checked); {len(lines)} compactions: "
      f"longest slice {fmt(slices)}; switch {fmt(switches)}; whole compaction {fmt(totals)}")
PY
[ "$ONLY" = embedded ] && { echo "scale: done (embedded only); summary in $OUT/summary.txt"; exit 0; }

# --- etcd, three replicas ---------------------------------------------------
ETCD_PORT=$(free_port); ETCD_PEER=$(free_port)
etcd --name scale --data-dir "$OUT/etcd" --quota-backend-bytes 8589934592 \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "scale=http://127.0.0.1:$ETCD_PEER" --logger zap --log-level error 2>"$OUT/etcd.log" &
pids+=($!)
wait_port "$ETCD_PORT" 600
ETCD="http://127.0.0.1:$ETCD_PORT"
proposals() { curl -s "$ETCD/metrics" | awk '/^etcd_server_proposals_committed_total/ { print $2 }'; }
REPLICA_URLS=()
REPLICA_PIDS=()
REPLICA_PORTS=()
for i in 0 1 2; do
  port=$(free_port)
  start_server "$port" "$OUT/replica-$i.log" --etcd-endpoints "$ETCD"
  REPLICA_URLS+=("http://127.0.0.1:$port")
  REPLICA_PIDS+=("$SERVER_PID")
  REPLICA_PORTS+=("$port")
done
ALL=$(IFS=,; echo "${REPLICA_URLS[*]}")
started=$(now)
storm=$(bench --server "$ALL" --connections 3 --method register --requests 10000 --concurrency 64 --duration 900)
unavailable=$(cat "$OUT"/replica-*.log | grep -c 'code="UNAVAILABLE"' || true)
report "etcd: 10,000 workers registering at once over 3 replicas (c=64): $(since "$started") s, errors $(json "$storm" errors), UNAVAILABLE answers $unavailable"
rest=$((WORKERS - 10000))
started=$(now)
result=$(bench --server "$ALL" --connections 3 --method register --requests "$rest" --concurrency 64 --duration 1800)
report "etcd: $rest more workers in $(since "$started") s, errors $(json "$result" errors)"
for i in 0 1 2; do
  report "etcd: replica $i RSS with $WORKERS workers: $(rss_mib "${REPLICA_PIDS[$i]}") MiB"
done
read -r seconds count < <(page_all "${REPLICA_URLS[0]}")
report "etcd: paging through ListWorkers on one replica ($count workers): $seconds s"
started=$(now)
stop_server "${REPLICA_PIDS[2]}"
report "etcd: SIGTERM to exit of a replica with $WORKERS workers (counters persisted): $(since "$started") s"
started=$(now)
start_server "${REPLICA_PORTS[2]}" "$OUT/replica-2-restart.log" --etcd-endpoints "$ETCD"
report "etcd: replica restart with $WORKERS workers, start to listening: $(since "$started") s; RSS $(rss_mib "$SERVER_PID") MiB"

# etcd writes per million rooms, steady state: ours against the CAS counter.
bench --server "${REPLICA_URLS[0]}" --method allocate --workers 4 --concurrency 16 --duration 3 >/dev/null
before=$(proposals)
ours=$(bench --server "${REPLICA_URLS[0]}" --method allocate --workers 4 --concurrency 16 --duration 20)
after=$(proposals)
rooms=$(json "$ours" rooms)
before_cas=$(proposals)
cas=$(bench --method etcd-cas --etcd-endpoints "$ETCD" --concurrency 16 --duration 10)
after_cas=$(proposals)
python3 - "$before" "$after" "$rooms" "$before_cas" "$after_cas" "$(json "$cas" rooms)" <<'PY' | tee -a "$OUT/summary.txt"
import sys
b, a, rooms, bc, ac, cas_rooms = map(float, sys.argv[1:])
print(f"etcd: steady AllocateRoom (4 workers, c=16, 20 s, {rooms:,.0f} rooms): {(a - b) / rooms * 1e6:,.0f} committed etcd writes per million rooms; "
      f"the etcd CAS counter: {(ac - bc) / cas_rooms * 1e6:,.0f} per million")
PY
echo "scale: done; summary in $OUT/summary.txt"
