#!/usr/bin/env bash
# How cost grows, one figure per release (BENCHMARKS.md, "How cost grows"):
# AllocateRoom rooms/s and p99 with 1, 1,000 and 100,000 workers, on the
# embedded store, on one etcd-backed replica and on three (one etcd member),
# each against the ceiling server (tonic + one AtomicU64 per worker)
# measured in the same run. c=64; each repetition loads every target in
# turn, so drift of the machine touches all alike; medians and min-max.
# Every room is checked by the load generator (duplicates, misalignment).
# All traffic on 127.0.0.1.
#
# Usage: scripts/growth.sh   (REPS=3 DURATION=5 WORKERS="1 1000 100000")
#   BIN=path uses that binary (not built).
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-5}
WORKERS=${WORKERS:-"1 1000 100000"}
OUT=${OUT:-target/growth}
for tool in etcd python3; do
  command -v "$tool" >/dev/null || { echo "growth.sh needs $tool" >&2; exit 1; }
done
cargo build --release --locked --example ceiling_server
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
serve() { # log, then serve flags; sets SERVED to the URL once it listens
  local port log=$1; shift
  port=$(free_port)
  "$BIN" serve --listen "127.0.0.1:$port" --metrics-listen 127.0.0.1:0 --max-workers 1000000 --worker-threads 1 "$@" \
    >/dev/null 2>"$log" &
  pids+=($!)
  wait_port "$port" 600
  SERVED="http://127.0.0.1:$port"
}

CEILING_PORT=$(free_port)
target/release/examples/ceiling_server --listen "127.0.0.1:$CEILING_PORT" --worker-threads 1 \
  2>"$OUT/ceiling.log" &
pids+=($!)
wait_port "$CEILING_PORT"
ETCD_PORT=$(free_port); ETCD_PEER=$(free_port)
etcd --name growth --data-dir "$OUT/etcd" --quota-backend-bytes 8589934592 \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "growth=http://127.0.0.1:$ETCD_PEER" --logger zap --log-level error 2>"$OUT/etcd.log" &
pids+=($!)
wait_port "$ETCD_PORT" 600
ETCD="http://127.0.0.1:$ETCD_PORT"

declare -A URL
URL[ceiling]="http://127.0.0.1:$CEILING_PORT"
serve "$OUT/embedded.log" --data-dir "$OUT/embedded"
URL[embedded]=$SERVED
serve "$OUT/etcd-1.log" --etcd-endpoints "$ETCD" --etcd-prefix /growth-1/
URL[etcd-1]=$SERVED
three=()
for i in 0 1 2; do
  serve "$OUT/etcd-3-$i.log" --etcd-endpoints "$ETCD" --etcd-prefix /growth-3/
  three+=("$SERVED")
done
URL[etcd-3]=$(IFS=,; echo "${three[*]}")

for workers in $WORKERS; do
  for rep in $(seq "$REPS"); do
    for target in ceiling embedded etcd-1 etcd-3; do
      echo "== $workers workers, rep $rep, $target" >&2
      connections=1
      [ "$target" = etcd-3 ] && connections=3
      # The bench registers its workers first (again: a no-op after the
      # first repetition), then measures.
      "$BIN" bench --worker-threads 1 --duration "$DURATION" --concurrency 64 --workers "$workers" \
        --connections "$connections" --server "${URL[$target]}" 2>>"$OUT/bench.log" | tail -1 |
        TARGET=$target WORKERS_N=$workers python3 -c 'import json, os, sys; d = json.load(sys.stdin); d["target"] = os.environ["TARGET"]; d["workers_n"] = int(os.environ["WORKERS_N"]); print(json.dumps(d))' \
        >>"$OUT/results.jsonl"
    done
  done
done

OUT=$OUT python3 - <<'PY' | tee "$OUT/summary.md"
import json, os, statistics
rows = [json.loads(line) for line in open(os.environ["OUT"] + "/results.jsonl")]
print("| workers | server | rooms/s, median (min–max) | × ceiling | p99, median (min–max) |")
print("|---|---|---|---|---|")
checked = dup = mis = errors = 0
for r in rows:
    checked += r["checked_rooms"]; dup += r["duplicates"]; mis += r["misaligned"]; errors += r["errors"]
for w in sorted({r["workers_n"] for r in rows}):
    def of(target, key):
        return [r[key] for r in rows if r["workers_n"] == w and r["target"] == target]
    ceiling = statistics.median(of("ceiling", "rooms_per_sec"))
    for target in ("ceiling", "embedded", "etcd-1", "etcd-3"):
        rate, p99 = of(target, "rooms_per_sec"), [v / 1000 for v in of(target, "p99_us")]
        print(f"| {w:,} | {target} | {statistics.median(rate):,.0f} ({min(rate):,.0f}–{max(rate):,.0f}) | "
              f"{statistics.median(rate) / ceiling:.2f} | {statistics.median(p99):.2f} ms ({min(p99):.2f}–{max(p99):.2f}) |")
print(f"\n{checked:,} rooms checked: {dup} duplicates, {mis} misaligned; {errors} errors")
PY
