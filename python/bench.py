#!/usr/bin/env python3
"""Rooms per second from Python: leased rooms against one RPC per room.

Measures, in one run against one server:

- ``RoomClient.allocate`` (leased) from one Python thread;
- ``AsyncRoomClient.allocate`` (leased) from one asyncio loop;
- ``RoomClient.allocate_room``: one AllocateRoom RPC per room (sync),

- ``RoomClient.allocate_many`` (a batch of 8) and ``allocate_block`` (a
  block of 3, SGLang's ``n = 3``), per call;

each for ``--duration`` seconds after a short warm-up, cycling over
``--workers`` prefill workers of ``--dp-size`` and all their ranks. Every
room is checked afterwards (unique across all methods, ``room % dp_size ==
dp_rank``). Prints a table, the ratios to the RPC path, and one JSON line.
Then the first call of a new client, the median of ``FIRST_CALL_RUNS``:
cold (the call connects and leases) and after ``warm_up``.

    python python/bench.py                         # starts target/release (or debug) room-allocator
    python python/bench.py --bin PATH              # starts that binary
    python python/bench.py --server 127.0.0.1:50051  # uses a running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import grpc

import room_allocator
from room_allocator import AsyncRoomClient, RoomClient

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Rooms between two clock reads on the leased paths (a read costs about as
#: much as a leased room); the RPC path reads the clock after every room.
CHECK_EVERY = 512
#: New clients timed for the first-call figures (the median is printed).
FIRST_CALL_RUNS = 7


def start_server(binary: Path, directory: Path) -> Tuple[subprocess.Popen, str]:
    log_path = directory / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(binary), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             "--data-dir", str(directory / "data")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        match = re.search(r"listening.*grpc_addr=(\S+)", log_path.read_text(errors="replace"))
        if match:
            return process, match[1]
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=10)
    sys.exit(f"bench: the server did not start; log:\n{log_path.read_text(errors='replace')}")


def default_binary() -> Path:
    configured = os.environ.get("ROOM_ALLOCATOR_BIN")
    if configured:
        return Path(configured)
    release = REPO_ROOT / "target" / "release" / "room-allocator"
    return release if release.is_file() else REPO_ROOT / "target" / "debug" / "room-allocator"


Sample = Tuple[int, int, int]  # (worker index, dp_rank, room)


def plan(workers: int, dp_size: int) -> List[Tuple[int, int]]:
    """The (worker, rank) pairs cycled through: every rank of every worker."""
    return [(w, r) for r in range(dp_size) for w in range(workers)]


def run_sync(
    allocate: Callable[[str, int, int], int], names: List[str], dp_size: int, seconds: float, check_every: int = CHECK_EVERY
) -> Tuple[List[Sample], float]:
    pairs = plan(len(names), dp_size)
    out: List[Sample] = []
    append = out.append
    i = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(check_every):
            w, r = pairs[i % len(pairs)]
            append((w, r, allocate(names[w], r, dp_size)))
            i += 1
        now = time.perf_counter()
        if now >= deadline:
            return out, now - start


async def run_async(client: AsyncRoomClient, names: List[str], dp_size: int, seconds: float) -> Tuple[List[Sample], float]:
    pairs = plan(len(names), dp_size)
    out: List[Sample] = []
    append = out.append
    allocate = client.allocate
    i = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(CHECK_EVERY):
            w, r = pairs[i % len(pairs)]
            append((w, r, await allocate(names[w], r, dp_size)))
            i += 1
        now = time.perf_counter()
        if now >= deadline:
            return out, now - start


def first_call_ms(address: str, name: str, dp_size: int) -> Dict[str, float]:
    """Milliseconds of a new client's first ``allocate``, median of
    ``FIRST_CALL_RUNS`` clients: cold, and after ``warm_up`` (not timed)."""
    def median(values: List[float]) -> float:
        return round(sorted(values)[len(values) // 2] * 1000, 3)

    cold, warm, acold, awarm = [], [], [], []
    for _ in range(FIRST_CALL_RUNS):
        start = time.perf_counter()
        with RoomClient(address) as client:
            client.allocate(name, 0, dp_size)
            cold.append(time.perf_counter() - start)
        with RoomClient(address) as client:
            client.warm_up([(name, dp_size)])
            start = time.perf_counter()
            client.allocate(name, 0, dp_size)
            warm.append(time.perf_counter() - start)

    async def async_first() -> None:
        for _ in range(FIRST_CALL_RUNS):
            start = time.perf_counter()
            async with AsyncRoomClient(address) as client:
                await client.allocate(name, 0, dp_size)
                acold.append(time.perf_counter() - start)
            async with AsyncRoomClient(address) as client:
                await client.warm_up([(name, dp_size)])
                start = time.perf_counter()
                await client.allocate(name, 0, dp_size)
                awarm.append(time.perf_counter() - start)

    asyncio.run(async_first())
    return {
        "RoomClient first allocate, cold (ms)": median(cold),
        "RoomClient first allocate after warm_up (ms)": median(warm),
        "AsyncRoomClient first allocate, cold (ms)": median(acold),
        "AsyncRoomClient first allocate after warm_up (ms)": median(awarm),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="host:port of a running server (default: start one)")
    parser.add_argument("--bin", type=Path, default=None, help="server binary to start (default: $ROOM_ALLOCATOR_BIN, else target/release, else target/debug)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per method (default 5)")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up per method (default 0.5)")
    parser.add_argument("--workers", type=int, default=4, help="prefill workers (default 4)")
    parser.add_argument("--dp-size", type=int, default=8, help="dp_size of each worker (default 8)")
    args = parser.parse_args()

    process: Optional[subprocess.Popen] = None
    tmp = tempfile.TemporaryDirectory(prefix="room-allocator-bench-")
    binary = "(running server)"
    try:
        if args.server:
            address = args.server
        else:
            binary_path = (args.bin or default_binary()).resolve()
            binary = str(binary_path)
            process, address = start_server(binary_path, Path(tmp.name))
        names = [f"bench-{os.getpid()}-{i}" for i in range(args.workers)]
        results: Dict[str, Tuple[List[Sample], float]] = {}
        with RoomClient(address) as client:
            for name in names:
                client.register(name, args.dp_size)
            run_sync(client.allocate, names, args.dp_size, args.warmup)
            results["RoomClient.allocate (leased, 1 thread)"] = run_sync(client.allocate, names, args.dp_size, args.duration)
            batch = 8

            def allocate_many(name: str, rank: int, dp_size: int) -> int:
                # The batch's first room stands for the call in the checks;
                # its other rooms are distinct numbers all the same.
                return client.allocate_many(name, [(rank + i) % dp_size for i in range(batch)], dp_size)[0]

            def allocate_block(name: str, rank: int, dp_size: int) -> int:
                return client.allocate_block(name, rank, 3, dp_size)

            run_sync(allocate_many, names, args.dp_size, args.warmup)
            results[f"RoomClient.allocate_many ({batch} rooms) per call"] = run_sync(
                allocate_many, names, args.dp_size, args.duration
            )
            run_sync(allocate_block, names, args.dp_size, args.warmup)
            results["RoomClient.allocate_block (3 rooms) per call"] = run_sync(
                allocate_block, names, args.dp_size, args.duration
            )

        async def async_bench() -> Tuple[List[Sample], float]:
            async with AsyncRoomClient(address) as aclient:
                await run_async(aclient, names, args.dp_size, args.warmup)
                return await run_async(aclient, names, args.dp_size, args.duration)

        results["AsyncRoomClient.allocate (leased, 1 loop)"] = asyncio.run(async_bench())

        with RoomClient(address) as client:
            def allocate_room(name: str, rank: int, dp_size: int) -> int:
                return client.allocate_room(name, rank, dp_size).room

            run_sync(allocate_room, names, args.dp_size, args.warmup, check_every=1)
            results["AllocateRoom RPC per room (sync)"] = run_sync(
                allocate_room, names, args.dp_size, args.duration, check_every=1
            )
        first_call = first_call_ms(address, names[0], args.dp_size)
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        tmp.cleanup()

    # Check every measured room (the warm-up rooms were checked by nobody,
    # but are distinct numbers all the same).
    seen: set = set()
    checked = duplicates = misaligned = 0
    for samples, _ in results.values():
        for _, rank, room in samples:
            checked += 1
            if room in seen:
                duplicates += 1
            seen.add(room)
            if room % args.dp_size != rank or not 1 <= room < 2**63:
                misaligned += 1

    rpc_rate = None
    rows = []
    for method, (samples, elapsed) in results.items():
        rate = len(samples) / elapsed
        rows.append((method, len(samples), elapsed, rate))
        if method.startswith("AllocateRoom"):
            rpc_rate = rate
    print(f"\nroom-allocator Python client {room_allocator.__version__}, grpcio {grpc.__version__}, "
          f"Python {platform.python_version()}; server: {binary} at {address}; "
          f"{args.workers} workers of dp_size {args.dp_size}; {args.duration:g} s per method\n")
    print(f"| {'method':<45} | {'calls':>10} | {'seconds':>7} | {'calls/s':>12} | {'us/call':>8} | {'x AllocateRoom':>14} |")
    print(f"|{'-' * 47}|{'-' * 12}:|{'-' * 8}:|{'-' * 13}:|{'-' * 9}:|{'-' * 15}:|")
    for method, count, elapsed, rate in rows:
        ratio = f"{rate / rpc_rate:,.1f}" if rpc_rate else "-"
        print(f"| {method:<45} | {count:>10,} | {elapsed:>7.2f} | {rate:>12,.0f} | {1e6 / rate:>8.2f} | {ratio:>14} |")
    print()
    for what, ms in first_call.items():
        print(f"{what}: {ms:.3f}")
    print(f"\nchecked {checked:,} rooms: {duplicates} duplicates, {misaligned} misaligned")
    print(json.dumps({
        "server": binary,
        "methods": {m: {"rooms": c, "seconds": round(e, 3), "rooms_per_s": round(r)} for m, c, e, r in rows},
        "first_call_ms": first_call,
        "checked": checked, "duplicates": duplicates, "misaligned": misaligned,
    }))
    return 0 if duplicates == 0 and misaligned == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
