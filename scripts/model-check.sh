#!/usr/bin/env bash
# Model-checks the multi-replica protocol (core/src/model/): every interleaving
# of replicas running the production's pure core against an abstract etcd,
# within small bounds, breadth first. See RELIABILITY.md.
#
#   scripts/model-check.sh                 the bounded check (the test command's)
#   scripts/model-check.sh --depth N       deeper (or shallower)
#   scripts/model-check.sh --long          a longer run
#   scripts/model-check.sh --deregistration   the deregistration's own scope
#   scripts/model-check.sh --mutant NAME   re-introduce a past defect: must be caught
#   scripts/model-check.sh --mutant list   the mutants' names
#
# The last line is `model: STATES states, UNIQUE unique, depth DEPTH, PROPS
# properties held, N violated`; on a violation the shortest trace comes
# first, and the exit status is 1.
set -euo pipefail
cd "$(dirname "$0")/.."
# The core crate alone: the checker and the pure code, no gRPC or storage stack.
cargo build --quiet --release -p room-allocator-core --features model-check --example model_check >&2
exec target/release/examples/model_check "$@"
