"""examples/pd_router.py runs against the real server, with its token."""

from __future__ import annotations

import subprocess
import sys

from conftest import PYTHON_DIR, ServerFactory

EXAMPLE = PYTHON_DIR / "examples" / "pd_router.py"


def run_example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=60)


def test_pd_router_example_runs_with_the_token(server_factory: ServerFactory) -> None:
    server = server_factory(token="example-token")
    token_file = str(server.files["token"])
    for _ in range(2):  # it leaves the server as it found it: a second run works too
        result = run_example(server.address, "--token-file", token_file, "--requests", "20")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count(" ok\n") == 20
        assert "dp_size mismatch: 10.0.0.2:8998 is registered with dp_size 4, the router believed 2" in result.stdout
        assert "all rooms aligned" in result.stdout
        assert "batch of 3 on 10.0.0.1:8998" in result.stdout and "ranks [0, 1, 2]" in result.stdout
        assert "n = 3 on 10.0.0.1:8998" in result.stdout and "on ranks [1, 2, 3], all issued" in result.stdout


def test_pd_router_example_explains_a_missing_token(server_factory: ServerFactory) -> None:
    server = server_factory(token="example-token")
    result = run_example(server.address)
    assert result.returncode == 2
    assert "--token-file" in result.stderr
