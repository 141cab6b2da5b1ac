#!/usr/bin/env bash
# The fault harness (tests/it/fault_harness.rs) for as long as asked: three
# replicas on a real etcd, router processes of every kind, and round after
# round of kill -9, SIGSTOP/SIGCONT of a replica and of etcd, etcd restarts
# and a partition between one replica and etcd; then again on a three-member
# etcd cluster (members killed, paused, and one cut off from the others);
# then every room every router received is checked. The test command runs
# each for 45 s.
#
# Usage: scripts/fault-harness.sh [--long SECONDS]   (default 600)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=600
if [ "${1:-}" = "--long" ]; then
  seconds=${2:-600}
fi
command -v etcd >/dev/null 2>&1 || { echo "fault-harness: needs etcd (apt-get install etcd-server)" >&2; exit 1; }
report="target/fault-harness-report.txt"
mkdir -p target
rm -f "$report"
CI=true HARNESS_SECONDS="$seconds" HARNESS_REPORT="$report" \
  cargo test --features failpoints --test it -- --nocapture fault_harness::three_replicas
cat "$report"
