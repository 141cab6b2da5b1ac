#!/usr/bin/env bash
# Long fuzzing runs of every decoder of bytes from disk or etcd (src/fuzz.rs),
# on the stable toolchain: rounds of FUZZ_ITERATIONS mutations per target,
# each round with a new seed, until the time is up. A failing input is saved
# under fuzz/regressions/<target>/ (commit it: every test run replays it).
#
# Usage: scripts/fuzz.sh [SECONDS]   (default 600)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
iterations=${FUZZ_ITERATIONS:-2000000}
cargo test --release --lib fuzz --no-run
deadline=$(( $(date +%s) + seconds ))
round=0
total=0
while [ "$(date +%s)" -lt "$deadline" ]; do
  round=$((round + 1))
  FUZZ_SEED=$RANDOM$RANDOM FUZZ_ITERATIONS=$iterations cargo test --release --lib fuzz -q
  total=$((total + iterations * 6))
  echo "fuzz: round $round done, $total inputs so far, 0 failures"
done
