"""The checked-in stubs are what scripts/gen_stubs.py makes from the proto now."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PYTHON_DIR

GENERATED = ("room_allocator_pb2.py", "room_allocator_pb2.pyi", "room_allocator_pb2_grpc.py")


def test_checked_in_stubs_are_current(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None and os.environ.get("CI") != "true":
        pytest.skip("grpcio-tools is not installed (python/run_tests.sh installs it)")
    result = subprocess.run(
        [sys.executable, str(PYTHON_DIR / "scripts" / "gen_stubs.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    checked_in = PYTHON_DIR / "src" / "room_allocator" / "_pb"
    stale = [name for name in GENERATED if (tmp_path / name).read_bytes() != (checked_in / name).read_bytes()]
    assert not stale, f"{stale} differ from the proto: run python python/scripts/gen_stubs.py"


def test_the_installed_package_carries_the_stubs_and_py_typed() -> None:
    import room_allocator
    from room_allocator._pb import room_allocator_pb2

    package = Path(room_allocator.__file__).parent
    assert (package / "py.typed").is_file()
    assert (package / "_pb" / "room_allocator_pb2.pyi").is_file()
    # The descriptor keeps the proto's canonical name and package.
    assert room_allocator_pb2.DESCRIPTOR.name == "room_allocator/v1/room_allocator.proto"
    assert room_allocator_pb2.DESCRIPTOR.package == "room_allocator.v1"
    for name in GENERATED:
        assert (package / "_pb" / name).read_bytes() == (PYTHON_DIR / "src" / "room_allocator" / "_pb" / name).read_bytes()
