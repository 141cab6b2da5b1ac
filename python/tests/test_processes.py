"""Several router processes share one server: every room is unique, aligned
to the rank its router chose, and resolves to what the router asked for."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from room_allocator import Resolved, RoomClient

from conftest import Server

ROUTERS = 4
ROOMS_PER_ROUTER = 6000
DP_SIZES = [1, 2, 3, 4, 8, 16]


def test_four_router_processes_never_share_a_room(server: Server, worker: str) -> None:
    workers = [(f"{worker}-p{i}", size) for i, size in enumerate(DP_SIZES)]
    with RoomClient(server.address) as admin:
        for name, size in workers:
            admin.register(name, size)
        script = Path(__file__).with_name("router_process.py")
        specs = [f"{name}:{size}" for name, size in workers]
        routers = [
            subprocess.Popen(
                [sys.executable, str(script), server.address, str(seed), str(ROOMS_PER_ROUTER), *specs],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for seed in range(ROUTERS)
        ]
        results = []
        try:
            for router in routers:
                stdout, stderr = router.communicate(timeout=60)
                assert router.returncode == 0, stderr.decode(errors="replace")
                results.append(json.loads(stdout))
        finally:
            for router in routers:
                if router.poll() is None:
                    router.kill()
                    router.wait(timeout=10)

        allocations = [a for result in results for a in result]
        assert len(allocations) == ROUTERS * ROOMS_PER_ROUTER
        rooms = [a["room"] for a in allocations]
        assert len(set(rooms)) == len(rooms), "a room was handed out twice"
        for a in allocations:
            assert 1 <= a["room"] < 2**63 and a["room"] % a["s"] == a["r"]
        # The decode side: the rank recovered from the room is the router's.
        for a in random.Random(7).sample(allocations, 200):
            assert admin.resolve(a["room"]) == Resolved(a["w"], a["r"], a["s"])
        # Every router used every worker.
        assert all({a["w"] for a in result} == {name for name, _ in workers} for result in results)
