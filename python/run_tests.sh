#!/usr/bin/env bash
# Tests the Python client against the real server binary.
#
#   python/run_tests.sh [pytest args...]      (from anywhere; paths are the repo's)
#
# Creates (or reuses) a virtualenv at target/tools/pyvenv, installs the test
# tools and a fresh, non-editable `pip install "./python[sglang]"` (so the
# packaging is what is tested, with the real sglang-router from PyPI for the
# end-to-end test of `python -m room_allocator.sglang`), then runs pytest against $ROOM_ALLOCATOR_BIN (default
# target/debug/room-allocator). Needs Python >= 3.10 with venv and pip, and
# PyPI. Ends with one line `python: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

VENV="$REPO/target/tools/pyvenv"
# Test tools, pinned. grpcio-tools must be the version the checked-in stubs
# come from (python/scripts/gen_stubs.py), or the stubs test fails.
TEST_REQUIREMENTS=(pytest==9.2.0 cryptography==50.0.2 grpcio-tools==1.71.0)
export ROOM_ALLOCATOR_BIN="${ROOM_ALLOCATOR_BIN:-target/debug/room-allocator}"
[[ "$ROOM_ALLOCATOR_BIN" = /* ]] || ROOM_ALLOCATOR_BIN="$REPO/$ROOM_ALLOCATOR_BIN"

summary_written=0
summary() {
  [ "$summary_written" -eq 0 ] || return 0
  summary_written=1
  echo "python: $1 passed, $2 failed, ${3:-0} skipped"
}
# A setup failure still ends with the summary line the aggregator reads.
trap 'status=$?; [ $status -eq 0 ] || summary 0 1' EXIT

step() { printf '\n== %s\n' "$*"; }

pick_python() {
  for candidate in python3.11 python3.12 python3.13 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "run_tests.sh: needs Python >= 3.10" >&2
  return 1
}

step "virtualenv $VENV"
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  rm -rf "$VENV"
  "$(pick_python)" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" --version

# Reinstall the test tools only when their pins change: fast when up to date.
stamp="$VENV/.room-allocator-test-requirements"
if [ "$(cat "$stamp" 2>/dev/null)" != "${TEST_REQUIREMENTS[*]}" ]; then
  step "installing ${TEST_REQUIREMENTS[*]}"
  "$PY" -m pip install --quiet --disable-pip-version-check "${TEST_REQUIREMENTS[@]}"
  echo "${TEST_REQUIREMENTS[*]}" >"$stamp"
fi

step "pip install ./python[sglang] (fresh, not editable)"
# Stale build output could leak removed modules into the wheel.
rm -rf python/build python/src/room_allocator.egg-info
"$PY" -m pip uninstall --quiet --yes room-allocator >/dev/null 2>&1 || true
"$PY" -m pip install --quiet --disable-pip-version-check "./python[sglang]"
rm -rf python/build python/src/room_allocator.egg-info
"$PY" -m pip check
# Run from outside the source tree: tests import the installed package.
"$PY" -c 'import room_allocator, grpc, google.protobuf as p; print("room_allocator", room_allocator.__version__, "from", room_allocator.__file__); print("grpcio", grpc.__version__, "protobuf", p.__version__)'
"$PY" -c 'import importlib.metadata as m, sglang_router.mini_lb; print("sglang-router", m.version("sglang-router"))'

step "pytest (server: $ROOM_ALLOCATOR_BIN)"
report="$REPO/target/tools/python-tests.xml"
set +e
"$PY" -m pytest python/tests -p no:cacheprovider --junitxml="$report" -q "$@"
status=$?
set -e
counts=$("$PY" - "$report" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("0 1")
    sys.exit()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests = sum(int(s.get("tests", 0)) for s in suites)
failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(tests - failed - skipped, failed, skipped)
EOF
)
read -r passed failed skipped <<<"$counts"
# pytest failing with no test failed (a usage error, a crash) still counts.
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
summary "$passed" "$failed" "$skipped"
exit "$status"
