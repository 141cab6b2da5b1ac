"""End to end: two processes of SGLang's real mini load balancer
(``sglang_router.mini_lb`` from the ``sglang-router`` package), run by
``python -m room_allocator.sglang`` on one allocator, against fake prefill
and decode servers that apply SGLang's rules (``fake_sglang``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

pytest.importorskip("sglang_router.mini_lb", reason="needs the sglang extra: pip install './python[sglang]'")

from room_allocator import Resolved, RoomClient  # noqa: E402

from conftest import Server, ServerFactory  # noqa: E402
from fake_sglang import Cluster, FakeSglangServer, Seen  # noqa: E402

LB_START_TIMEOUT = 60.0
LB_STOP_TIMEOUT = 15.0
REQUEST_TIMEOUT = 30.0
TOKEN = "sglang-lb-test-token"
# Bootstrap ports the prefills' SGLang bootstrap servers would listen on.
P0_BOOTSTRAP = 19001
P1_BOOTSTRAP = 19002  # given to the LB as "none": learned from /server_info


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def no_proxy_open(request: Any, timeout: float = REQUEST_TIMEOUT) -> Any:
    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=timeout)


@dataclass
class Lb:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, endpoint: str, body: Dict[str, Any]) -> Tuple[int, bytes]:
        request = urllib.request.Request(
            f"{self.url}/{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with no_proxy_open(request) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=LB_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=LB_STOP_TIMEOUT)


def start_lb(directory: Path, allocator: Server, cluster: Cluster, token_file: Path) -> Lb:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "lb.log"
    router_args = ["--pd-disaggregation", "--mini-lb", "--host", "127.0.0.1", "--port", str(port)]
    router_args += ["--prefill", cluster.prefills[0].url, str(P0_BOOTSTRAP)]
    router_args += ["--prefill", cluster.prefills[1].url, "none"]
    for decode in cluster.decodes:
        router_args += ["--decode", decode.url]
    args = [sys.executable, "-m", "room_allocator.sglang", "--allocator", allocator.address]
    args += ["--token-file", str(token_file), "--", *router_args]
    env = {key: value for key, value in os.environ.items() if "PROXY" not in key.upper()}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=directory)
    lb = Lb(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + LB_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the LB exited with {process.returncode}; log:\n{lb.log()}")
        try:
            with no_proxy_open(f"{lb.url}/health", timeout=1) as response:
                if response.status == 200:
                    return lb
        except OSError:
            pass
        time.sleep(0.1)
    lb.stop()
    raise AssertionError(f"the LB did not answer /health within {LB_START_TIMEOUT} s; log:\n{lb.log()}")


@pytest.fixture()
def cluster() -> Iterator[Cluster]:
    prefill_dp_sizes: Dict[str, int] = {}
    p0 = FakeSglangServer("prefill", host="127.0.0.1", dp_size=4, bootstrap_port=P0_BOOTSTRAP)
    p1 = FakeSglangServer("prefill", host="::1", dp_size=3, bootstrap_port=P1_BOOTSTRAP)
    prefill_dp_sizes[f"127.0.0.1:{P0_BOOTSTRAP}"] = 4
    prefill_dp_sizes[f"[::1]:{P1_BOOTSTRAP}"] = 3
    # The decodes' own --disaggregation-bootstrap-port is the one P1 uses:
    # a request without a port names P1's bootstrap server.
    decodes = [
        FakeSglangServer("decode", dp_size=2, bootstrap_port=P1_BOOTSTRAP, prefill_dp_sizes=prefill_dp_sizes)
        for _ in range(2)
    ]
    cluster = Cluster([p0, p1], decodes)
    yield cluster
    cluster.close()


def requests_mix(count: int) -> List[Tuple[str, Dict[str, Any]]]:
    """Every shape of request the real LB routes: single, batches of text and
    input_ids, n > 1 single and batched, streaming, the OpenAI routes."""
    shapes: List[Tuple[str, Dict[str, Any]]] = [
        ("generate", {"text": "hi", "sampling_params": {"max_new_tokens": 1}}),
        ("generate", {"text": "hi", "stream": True}),
        ("generate", {"text": ["a", "b", "c"], "sampling_params": {"n": 1}}),
        ("generate", {"input_ids": [[1, 2], [3], [4, 5], [6], [7]]}),
        ("generate", {"text": "n3", "sampling_params": {"n": 3}}),
        ("generate", {"text": ["x", "y"], "sampling_params": {"n": 2}}),
        ("generate", {"input_ids": [1, 2, 3], "sampling_params": [{"n": 4}], "stream": True}),
        ("v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        ("v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True}),
        ("v1/completions", {"model": "m", "prompt": "hi"}),
        ("v1/completions", {"model": "m", "prompt": ["p", "q"], "n": 3}),
    ]
    out = []
    for i in range(count):
        endpoint, body = shapes[i % len(shapes)]
        out.append((endpoint, {**body, "rid": f"r{i}"}))
    return out


def send_all(lbs: List[Lb], requests: List[Tuple[str, Dict[str, Any]]]) -> None:
    def send(index: int) -> Tuple[int, bytes]:
        endpoint, body = requests[index]
        return lbs[index % len(lbs)].post(endpoint, body)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, range(len(requests))))
    failed = [(requests[i], status, payload[:300]) for i, (status, payload) in enumerate(results) if status != 200]
    assert not failed, f"{len(failed)} requests failed, first: {failed[0]}\n" + "\n".join(lb.log()[-3000:] for lb in lbs)


def by_rid(servers: List[FakeSglangServer]) -> Dict[str, Seen]:
    seen: Dict[str, Seen] = {}
    for server in servers:
        for record in server.seen:
            assert record.rid not in seen, f"request {record.rid} reached two {record.role} servers"
            seen[record.rid] = record
    return seen


def check_cluster(cluster: Cluster, allocator: RoomClient, names: Dict[int, Tuple[str, int]], expected: int) -> None:
    """Every invariant of the issue over what the fake servers saw.
    ``names`` maps a prefill's index to (allocator worker name, dp_size)."""
    errors = [error for server in cluster.prefills + cluster.decodes for error in server.errors]
    assert not errors, errors
    prefill_seen, decode_seen = by_rid(cluster.prefills), by_rid(cluster.decodes)
    assert len(prefill_seen) == len(decode_seen) == expected
    rooms: Counter[int] = Counter()
    for rid, prefill in prefill_seen.items():
        decode = decode_seen[rid]
        # The same body went to both halves.
        assert prefill.body == decode.body, rid
        index = next(i for i, server in enumerate(cluster.prefills) if prefill in server.seen)
        name, dp_size = names[index]
        n = (prefill.body.get("sampling_params") or {}) if prefill.endpoint == "generate" else prefill.body
        n = (n[0] if isinstance(n, list) else n).get("n", 1)
        if n > 1:
            # A list would make the samples of an item share its room.
            assert not isinstance(prefill.body["bootstrap_room"], list), rid
        first_rank = prefill.items[0].dp_rank
        for i, (p_item, d_item) in enumerate(zip(prefill.items, decode.items)):
            # Identical on both halves; the decode pulls from the rank the
            # prefill computed; the bootstrap address names the prefill.
            assert p_item.room == d_item.room and p_item.dp_rank == d_item.dp_rank, rid
            assert d_item.bootstrap == name, (rid, d_item.bootstrap, name)
            # Item i is on rank first + i: the LB's round robin, advanced
            # by the request's items.
            assert p_item.dp_rank == (first_rank + i) % dp_size, rid
            rooms[p_item.room] += 1
    repeated = [room for room, times in rooms.items() if times > 1]
    assert not repeated, f"{len(repeated)} rooms were used twice, e.g. {repeated[:5]}"
    # Every room resolves to the prefill that got it, at its rank.
    for index, server in enumerate(cluster.prefills):
        name, dp_size = names[index]
        per_rank: Counter[int] = Counter()
        for record in server.seen:
            for item in record.items:
                assert allocator.resolve(item.room) == Resolved(name, item.dp_rank, dp_size), item
                per_rank[item.dp_rank] += 1
        # Round robin per LB: each LB's counts differ by at most one.
        counts = [per_rank[rank] for rank in range(dp_size)]
        assert max(counts) - min(counts) <= 2, (name, counts)


def test_input_embeds_requests_are_refused_since_their_items_cannot_be_counted() -> None:
    # SGLang counts a batch of embeddings by their shape; the mini LB's count
    # does not look at them, so a single room would be expanded by SGLang
    # into room + i, other requests' rooms.
    from room_allocator.sglang import request_items

    with pytest.raises(ValueError, match="input_embeds"):
        request_items({"input_embeds": [[[0.1]], [[0.2]], [[0.3]]]}, "generate")
    assert request_items({"text": ["a", "b"]}, "generate") == (2, 1)


def test_two_real_sglang_mini_lbs_share_the_allocators_rooms(
    server_factory: ServerFactory, cluster: Cluster, tmp_path: Path
) -> None:
    allocator = server_factory(token=TOKEN)
    token_file = allocator.files["token"]
    lbs = [start_lb(tmp_path / f"lb{i}", allocator, cluster, token_file) for i in range(2)]
    names = {0: (f"127.0.0.1:{P0_BOOTSTRAP}", 4), 1: (f"[::1]:{P1_BOOTSTRAP}", 3)}
    try:
        with RoomClient(allocator.address, token=TOKEN) as client:
            # Registered at start, under SGLang's bootstrap address.
            assert {(w.prefill_worker, w.dp_size) for w in client.workers()} == set(names.values())
            requests = requests_mix(330)
            send_all(lbs, requests)
            check_cluster(cluster, client, names, len(requests))
            # Both LBs served, and every prefill got requests.
            assert all(server.seen for server in cluster.prefills)

    finally:
        for lb in lbs:
            lb.stop()


def test_the_lb_refuses_the_rust_router_and_a_bad_dp_size_flag(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "room_allocator.sglang", "--allocator", "127.0.0.1:1"]
    router = ["--", "--pd-disaggregation", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"]
    result = subprocess.run(base + router, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "add --mini-lb" in result.stderr, result.stderr
    result = subprocess.run(
        base + ["--prefill-dp-size", "http://127.0.0.1:1=zero"] + router + ["--mini-lb"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "expected URL=N" in result.stderr, result.stderr


def test_a_dp_size_mismatch_makes_the_lb_read_server_info_and_register_again(server_factory: ServerFactory) -> None:
    import asyncio

    from room_allocator.sglang import AllocatorOptions, RoomSource

    allocator = server_factory(token=TOKEN)
    prefill = FakeSglangServer("prefill", dp_size=4, bootstrap_port=P0_BOOTSTRAP)
    name = f"127.0.0.1:{P0_BOOTSTRAP}"

    async def main() -> None:
        source = RoomSource(AllocatorOptions(allocator.address, token=TOKEN), [(prefill.url, P0_BOOTSTRAP)])
        await source.start()
        try:
            worker = source.workers[(prefill.url, P0_BOOTSTRAP)]
            assert (worker.name, worker.dp_size) == (name, 4)
            assert (await source.rooms(worker, None, 1)) % 4 == 0
            # The prefill restarts with --dp-size 2 and an operator realigns
            # it; this LB's lease (still of dp_size 4) runs out.
            prefill.dp_size = 2
            with RoomClient(allocator.address, token=TOKEN) as admin:
                admin.register(name, 2)
            assert source.client is not None
            source.client._leases.drop(name)
            room = await source.rooms(worker, None, 1)
            assert worker.dp_size == 2 and room % 2 == 0
            block = await source.rooms(worker, None, 3)
            assert block % 2 == 1  # the rotation went on from rank 1
            with RoomClient(allocator.address, token=TOKEN) as client:
                assert client.resolve(room) == Resolved(name, 0, 2)
                assert client.resolve(block + 2) == Resolved(name, 1, 2)
        finally:
            await source.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        prefill.close()
