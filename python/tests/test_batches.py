"""Batches, contiguous blocks, the outage fallback and warm-up, in both
clients, against the real server."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Awaitable, List, Set, TypeVar

import pytest

from room_allocator import (
    MAX_ROOM,
    AsyncRoomClient,
    FallbackRoom,
    Resolved,
    RoomAllocatorError,
    RoomClient,
    RoomSpace,
)

from conftest import Server, ServerFactory, start_server

T = TypeVar("T")

#: The operator leaves 2^62..=2^63-1 to the fallback.
HALF = 1 << 62
SERVER_MAX_ROOM = HALF - 1
FALLBACK_REGION = (HALF, MAX_ROOM)


def run(coroutine: Awaitable[T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def block_numbers(room: int, num: int) -> Set[int]:
    return set(range(room, room + num))


def test_allocate_many_keeps_order_and_takes_one_lease_per_batch(fresh_server: Server) -> None:
    ranks = [i % 4 for i in range(1000)]  # more than the first lease (256)
    with RoomClient(fresh_server.address) as client:
        client.register("batch-0", 4)
        rooms = client.allocate_many("batch-0", ranks, 4)
        assert [room % 4 for room in rooms] == ranks
        assert len(set(rooms)) == len(rooms)
        # One inline LeaseRooms of at least the batch; the background refill
        # it may start comes on top.
        assert fresh_server.calls("AllocateRoom") == 0
        assert 1 <= fresh_server.calls("LeaseRooms") <= 2
        more = client.allocate_many("batch-0", [3, 0, 2], 4)
        assert [room % 4 for room in more] == [3, 0, 2]
        assert not set(more) & set(rooms)
        assert client.allocate_many("batch-0", [], 4) == []
        with pytest.raises(ValueError, match="dp_rank 4 is out of range"):
            client.allocate_many("batch-0", [0, 4], 4)
        for i in range(0, 1000, 97):
            assert client.resolve(rooms[i]) == Resolved("batch-0", ranks[i], 4)


def test_allocate_block_gives_contiguous_numbers_no_one_else_gets(server: Server, worker: str) -> None:
    with RoomClient(server.address) as client:
        client.register(worker, 3)
        taken: Set[int] = set()
        for first_rank, num in [(0, 1), (2, 5), (1, 3), (2, 2), (0, 7), (1, 300), (2, 1)] * 20:
            room = client.allocate_block(worker, first_rank, num, 3)
            assert room % 3 == first_rank
            numbers = block_numbers(room, num)
            assert not numbers & taken, f"block {room}+{num} overlaps earlier rooms"
            taken |= numbers
            single = client.allocate(worker, (first_rank + 1) % 3, 3)
            assert single not in taken
            taken.add(single)
            # Every number of the block resolves to its own rank: SGLang
            # sends item i of the request to rank (room + i) % 3.
            for i in (0, num - 1):
                assert client.resolve(room + i) == Resolved(worker, (first_rank + i) % 3, 3)
        with pytest.raises(ValueError, match="at least one room"):
            client.allocate_block(worker, 0, 0, 3)
        with pytest.raises(ValueError, match="more than one lease holds"):
            client.allocate_block(worker, 0, 1 << 25, 3)


def test_blocks_and_batches_from_two_clients_never_share_a_number(server: Server, worker: str) -> None:
    with RoomClient(server.address) as admin:
        admin.register(worker, 4)
    numbers: List[Set[int]] = [set(), set()]

    def router(index: int) -> None:
        with RoomClient(server.address) as client:
            for i in range(300):
                if i % 3 == 0:
                    room = client.allocate_block(worker, i % 4, 2 + i % 5, 4)
                    got = block_numbers(room, 2 + i % 5)
                else:
                    got = set(client.allocate_many(worker, [(i + k) % 4 for k in range(1 + i % 4)], 4))
                assert not got & numbers[index]
                numbers[index] |= got

    threads = [threading.Thread(target=router, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert numbers[0] and numbers[1]
    assert not numbers[0] & numbers[1]


def test_warm_up_connects_and_leases_before_the_first_request(fresh_server: Server) -> None:
    with RoomClient(fresh_server.address) as client:
        client.register("warm-0", 2)
        assert client.warm_up([("warm-0", 2)]) == RoomSpace(1, MAX_ROOM)
        assert fresh_server.calls("GetRoomSpace") == 1
        assert fresh_server.calls("LeaseRooms") == 1
        rooms = [client.allocate("warm-0", i % 2, 2) for i in range(50)]
        assert len(set(rooms)) == 50
        assert fresh_server.calls("LeaseRooms") == 1
        assert fresh_server.calls("AllocateRoom") == 0


def test_fallback_is_refused_when_its_region_overlaps_the_servers_rooms(server: Server) -> None:
    with RoomClient(server.address, fallback_region=FALLBACK_REGION) as client:
        with pytest.raises(ValueError, match="overlaps the rooms the allocator hands out"):
            client.warm_up()
    with pytest.raises(ValueError, match="not a non-empty part"):
        RoomClient(server.address, fallback_region=(0, 10))


def test_fallback_rooms_come_from_the_region_when_the_allocator_is_down(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server", ["--max-room", str(SERVER_MAX_ROOM)])
    reported: List[FallbackRoom] = []
    try:
        client = RoomClient(
            server.address, fallback_region=FALLBACK_REGION, allocation_deadline=0.05, on_fallback=reported.append
        )
        client.register("down-0", 4)
        assert client.warm_up([("down-0", 4)]) == RoomSpace(1, SERVER_MAX_ROOM)
        leased = [client.allocate("down-0", i % 4, 4) for i in range(10)]
        assert all(room <= SERVER_MAX_ROOM for room in leased)
        assert client.fallback_rooms == 0
    finally:
        assert server.stop() == 0, server.log()
    with client:
        # A worker with no lease: every allocation needs the allocator.
        room = client.allocate("down-1", 3, 4)
        assert HALF <= room <= MAX_ROOM and room % 4 == 3
        block = client.allocate_block("down-1", 1, 6, 4)
        assert HALF <= block and block + 5 <= MAX_ROOM and block % 4 == 1
        batch = client.allocate_many("down-1", [0, 1, 2], 4)
        assert [r % 4 for r in batch] == [0, 1, 2] and all(r >= HALF for r in batch)
        assert client.fallback_rooms == 5
        assert [(f.prefill_worker, f.dp_rank, f.num) for f in reported] == [
            ("down-1", 3, 1),
            ("down-1", 1, 6),
            ("down-1", 0, 1),
            ("down-1", 1, 1),
            ("down-1", 2, 1),
        ]
        assert all(f.cause.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED") for f in reported)


def test_no_fallback_room_before_the_servers_bounds_are_known(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server", ["--max-room", str(SERVER_MAX_ROOM)])
    address = server.address
    assert server.stop() == 0, server.log()
    with RoomClient(address, fallback_region=FALLBACK_REGION) as client:
        with pytest.raises(RoomAllocatorError) as raised:
            client.allocate("never-0", 0, 2)
        assert raised.value.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        assert client.fallback_rooms == 0


def test_async_batches_blocks_and_warm_up(fresh_server: Server) -> None:
    async def main() -> None:
        async with AsyncRoomClient(fresh_server.address) as client:
            await client.register("async-batch-0", 3)
            assert await client.warm_up([("async-batch-0", 3)]) == RoomSpace(1, MAX_ROOM)
            assert fresh_server.calls("LeaseRooms") == 1
            ranks = [i % 3 for i in range(600)]
            rooms = await client.allocate_many("async-batch-0", ranks, 3)
            assert [room % 3 for room in rooms] == ranks
            taken = set(rooms)
            assert len(taken) == len(rooms)
            for first_rank, num in [(1, 4), (0, 9), (2, 1000)]:
                room = await client.allocate_block("async-batch-0", first_rank, num, 3)
                assert room % 3 == first_rank
                assert not block_numbers(room, num) & taken
                taken |= block_numbers(room, num)
                assert await client.resolve(room + num - 1) == Resolved(
                    "async-batch-0", (first_rank + num - 1) % 3, 3
                )

    run(main())


def test_async_fallback_when_the_allocator_is_down(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server", ["--max-room", str(SERVER_MAX_ROOM)])
    reported: List[FallbackRoom] = []

    async def main() -> None:
        client = AsyncRoomClient(server.address, fallback_region=FALLBACK_REGION, on_fallback=reported.append)
        try:
            await client.warm_up()
            assert server.stop() == 0, server.log()
            room = await client.allocate("async-down-0", 1, 2)
            assert room >= HALF and room % 2 == 1
            block = await client.allocate_block("async-down-0", 0, 3, 2)
            assert block >= HALF and block % 2 == 0
            batch = await client.allocate_many("async-down-0", [1, 0], 2)
            assert [r % 2 for r in batch] == [1, 0] and min(batch) >= HALF
            assert client.fallback_rooms == 4 == len(reported)
        finally:
            await client.close()

    try:
        run(main())
    finally:
        server.stop()


def test_a_forked_child_draws_its_own_fallback_rooms(tmp_path: Path) -> None:
    from test_fork import fork_child

    server = start_server(tmp_path / "server", ["--max-room", str(SERVER_MAX_ROOM)])
    with RoomClient(server.address, fallback_region=FALLBACK_REGION) as client:
        client.warm_up()
        assert server.stop() == 0, server.log()
        # The count's lock is held while the child is forked: the child must
        # not wait for a parent thread it does not have.
        with client._fallback._count_lock:  # type: ignore[union-attr]
            child = fork_child("os.fork", lambda: [client.allocate("fork-down-0", 1, 2) for _ in range(3)])
        child_rooms = child.rooms()
        parent_rooms = [client.allocate("fork-down-0", 1, 2) for _ in range(3)]
        assert all(room >= HALF and room % 2 == 1 for room in child_rooms + parent_rooms)
        assert len(set(child_rooms + parent_rooms)) == 6
        assert client.fallback_rooms == 3


def test_bounds_that_move_over_the_region_disarm_the_fallback() -> None:
    # A replica with other bounds (a rolling change of --max-room) may answer
    # later: once bounds overlap the region, no fallback room may leave.
    from room_allocator._fallback import Fallback
    from room_allocator._types import RoomSpace
    from room_allocator.errors import Unavailable

    fallback = Fallback((1 << 62, (1 << 63) - 1), 0.05, None)
    fallback.learn(RoomSpace(min_room=1, max_room=(1 << 62) - 1))
    outage = Unavailable.__new__(Unavailable)
    assert fallback.room("w", 1, 2, 1, outage) % 2 == 1
    with pytest.raises(ValueError, match="overlaps"):
        fallback.learn(RoomSpace(min_room=1, max_room=(1 << 63) - 1))
    with pytest.raises(Unavailable):
        fallback.room("w", 1, 2, 1, outage)
