"""Starts the real room-allocator binary for the tests.

The binary is ``$ROOM_ALLOCATOR_BIN``, by default ``target/debug/room-allocator``
of this repository. Every server listens on 127.0.0.1 with free ports, keeps
its data in a temporary directory, and is stopped with SIGTERM (by PID) when
its fixture ends; it must then exit 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON_DIR = REPO_ROOT / "python"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
_LISTENING = re.compile(r"listening.*grpc_addr=(\S+).*metrics_addr=(\S+)")


def server_binary() -> Path:
    configured = os.environ.get("ROOM_ALLOCATOR_BIN")
    binary = Path(configured) if configured else REPO_ROOT / "target" / "debug" / "room-allocator"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"no room-allocator binary at {binary}: build it (cargo build) or set ROOM_ALLOCATOR_BIN",
            pytrace=False,
        )
    return binary.resolve()


@dataclass
class Server:
    """One running server: ``address`` is its gRPC ``host:port``."""

    process: subprocess.Popen
    address: str
    metrics_address: str
    log_path: Path
    token: Optional[str] = None
    files: Dict[str, Path] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> Dict[str, float]:
        """``room_allocator_requests_total`` by ``method/code``."""
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://{self.metrics_address}/metrics", timeout=5
        ) as response:
            text = response.read().decode()
        counts: Dict[str, float] = {}
        for match in re.finditer(r'^room_allocator_requests_total\{method="(\w+)",code="(\w+)"\} (\S+)$', text, re.M):
            counts[f"{match[1]}/{match[2]}"] = float(match[3])
        return counts

    def calls(self, method: str, code: str = "OK") -> int:
        return int(self.metrics().get(f"{method}/{code}", 0))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(f"the server ignored SIGTERM for {STOP_TIMEOUT} s; log:\n{self.log()}")
        return self.process.returncode


def start_server(directory: Path, extra_args: Sequence[str] = (), token: Optional[str] = None) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "server.log"
    args = [
        str(server_binary()),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        str(directory / "data"),
        *extra_args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOM_ALLOCATOR_")}
    env.setdefault("RUST_LOG", "info")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = _LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            return Server(process, match[1], match[2], log_path, token)
        if process.poll() is not None:
            break
        time.sleep(0.02)
    if process.poll() is None:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
    raise AssertionError(f"the server did not start ({' '.join(args)}); log:\n{log_path.read_text(errors='replace')}")


ServerFactory = Callable[..., Server]


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """``server_factory(*flags, token=None)`` starts a server; all are stopped
    (and must exit 0) at the end of the session."""
    servers: List[Server] = []

    def start(*extra_args: str, token: Optional[str] = None) -> Server:
        directory = tmp_path_factory.mktemp("server")
        if token is not None:
            token_file = directory / "token"
            token_file.write_text(token + "\n")
            extra_args = (*extra_args, "--auth-token-file", str(token_file))
        server = start_server(directory, extra_args, token)
        if token is not None:
            server.files["token"] = token_file
        servers.append(server)
        return server

    yield start
    failures = []
    for server in servers:
        status = server.stop()
        if status != 0:
            failures.append(f"server {server.address} exited with {status}; log:\n{server.log()}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="session")
def server(server_factory: ServerFactory) -> Server:
    """A plain server shared by the tests; they use distinct worker names."""
    return server_factory()


@pytest.fixture()
def fresh_server(tmp_path: Path) -> Iterator[Server]:
    """A server of its own, for tests that count calls in its metrics."""
    server = start_server(tmp_path / "server")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture()
def worker(request: pytest.FixtureRequest) -> str:
    """A prefill_worker name no other test uses."""
    return f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"
