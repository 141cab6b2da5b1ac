#!/usr/bin/env bash
# An interleaved A/B of AllocateRoom: this tree's server against the server
# of an earlier commit, with the ceiling server (tonic + one AtomicU64 per
# worker) as the reference measured in the same run. Each repetition runs
# every concurrency against the three servers in turn, so drift of the
# machine (a noisy neighbour, thermal limits) touches all three alike.
# All traffic on 127.0.0.1; every room checked by the load generator.
#
# Usage: scripts/ab.sh REF          e.g. scripts/ab.sh 2a0dbb8
#        REPS=9 DURATION=5 CONCURRENCY="16 64" scripts/ab.sh REF
# Prints one markdown table (medians, min–max spreads, ratios) and the
# rooms checked; BENCHMARKS.md quotes it with this command.
set -euo pipefail
cd "$(dirname "$0")/.."

REF=${1:?usage: scripts/ab.sh REF (a commit to compare this tree with)}
REPS=${REPS:-9}
DURATION=${DURATION:-5}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
OUT=target/ab
REF_SHA=$(git rev-parse --verify "$REF^{commit}")
REF_TREE="$OUT/tree-$REF_SHA"
# One target dir for every ref, so dependencies build once.
REF_TARGET="$PWD/target/ab-target"

command -v python3 >/dev/null || { echo "ab.sh needs python3" >&2; exit 1; }
cargo build --release --locked --bin room-allocator --example ceiling_server
mkdir -p "$OUT"
if [ ! -d "$REF_TREE" ]; then
  git worktree add --detach "$REF_TREE" "$REF_SHA" >/dev/null
fi
(cd "$REF_TREE" && CARGO_TARGET_DIR="$REF_TARGET" cargo build --release --locked --bin room-allocator)
BIN=target/release/room-allocator
REF_BIN="$REF_TARGET/release/room-allocator"
rm -rf "$OUT/run" && mkdir -p "$OUT/run"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  git worktree remove --force "$REF_TREE" 2>/dev/null || true
}
trap cleanup EXIT
. scripts/ports.sh

THIS_PORT=$(free_port); REF_PORT=$(free_port); CEILING_PORT=$(free_port)
"$BIN" serve --listen "127.0.0.1:$THIS_PORT" --metrics-listen 127.0.0.1:0 --data-dir "$OUT/run/this" \
  --worker-threads 1 2>"$OUT/run/this.log" &
pids+=($!)
"$REF_BIN" serve --listen "127.0.0.1:$REF_PORT" --metrics-listen 127.0.0.1:0 --data-dir "$OUT/run/ref" \
  --worker-threads 1 2>"$OUT/run/ref.log" &
pids+=($!)
target/release/examples/ceiling_server --listen "127.0.0.1:$CEILING_PORT" --worker-threads 1 \
  2>"$OUT/run/ceiling.log" &
pids+=($!)
for port in "$THIS_PORT" "$REF_PORT" "$CEILING_PORT"; do wait_port "$port"; done

for rep in $(seq "$REPS"); do
  for c in $CONCURRENCY; do
    for target in this:$THIS_PORT ref:$REF_PORT ceiling:$CEILING_PORT; do
      label=${target%%:*}
      echo "== rep $rep, c=$c, $label" >&2
      "$BIN" bench --worker-threads 1 --duration "$DURATION" --concurrency "$c" \
        --server "http://127.0.0.1:${target##*:}" 2>>"$OUT/run/bench.log" | tail -1 |
        LABEL=$label python3 -c 'import json, os, sys; d = json.load(sys.stdin); d["label"] = os.environ["LABEL"]; print(json.dumps(d))' \
        >>"$OUT/run/results.jsonl"
    done
  done
done

REF_SHORT=$(git rev-parse --short "$REF_SHA") THIS=$(git describe --always --dirty) OUT=$OUT python3 - <<'PY'
import json, os, statistics
rows = [json.loads(line) for line in open(os.environ["OUT"] + "/run/results.jsonl")]
def values(label, c):
    return [r["rooms_per_sec"] for r in rows if r["label"] == label and r["concurrency"] == c]
ref, this = os.environ["REF_SHORT"], os.environ["THIS"]
print(f"| concurrency | this ({this}) | {ref} | ceiling | this / ceiling | {ref} / ceiling | this / {ref} |")
print("|---|---|---|---|---|---|---|")
for c in sorted({r["concurrency"] for r in rows}):
    t, r, x = (statistics.median(values(l, c)) for l in ("this", "ref", "ceiling"))
    spread = lambda l: f"{min(values(l, c)):,.0f}–{max(values(l, c)):,.0f}"
    print(f"| {c} | {t:,.0f} ({spread('this')}) | {r:,.0f} ({spread('ref')}) | {x:,.0f} ({spread('ceiling')}) "
          f"| {t/x:.2f} | {r/x:.2f} | {t/r:.2f} |")
bad = sum(r.get("duplicates", 0) + r.get("misaligned", 0) for r in rows)
checked = sum(r.get("checked_rooms", 0) for r in rows)
print(f"\nmedians of {len(values('this', rows[0]['concurrency']))} interleaved runs; "
      f"{checked:,} rooms checked, {bad} duplicates or misaligned")
PY
