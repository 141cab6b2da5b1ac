"""AsyncRoomClient against the real server (asyncio.run per test, no plugin)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

import grpc
import pytest

from room_allocator import (
    AllocatedRoom,
    AsyncRoomClient,
    DpSizeMismatch,
    Resolved,
    WorkerDeregistered,
    WorkerInfo,
    WorkerNotFound,
)

from conftest import Server

T = TypeVar("T")


def run(coroutine: Awaitable[T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def wait_until(condition, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def test_async_rooms_are_unique_aligned_and_resolve(server: Server, worker: str) -> None:
    async def main() -> None:
        async with AsyncRoomClient(server.address) as client:
            assert await client.register(worker, 3) == WorkerInfo(worker, 3, 0)
            rooms = [await client.allocate(worker, i % 3, 3) for i in range(5000)]
            assert len(set(rooms)) == len(rooms)
            assert all(room % 3 == i % 3 for i, room in enumerate(rooms))
            for i in range(0, 5000, 500):
                assert await client.resolve(rooms[i]) == Resolved(worker, i % 3, 3)

    run(main())


def test_async_tasks_sharing_one_client_never_get_the_same_room(fresh_server: Server) -> None:
    async def main() -> list:
        async with AsyncRoomClient(fresh_server.address) as client:
            await client.register("prefill-0", 8)

            async def router(rank: int) -> list:
                rooms = []
                for _ in range(2000):
                    rooms.append(await client.allocate("prefill-0", rank, 8))
                    if len(rooms) % 100 == 0:
                        await asyncio.sleep(0)  # let refills and the other tasks run
                return rooms

            return await asyncio.gather(*(router(rank) for rank in range(8)))

    per_task = run(main())
    rooms = [room for batch in per_task for room in batch]
    assert len(set(rooms)) == len(rooms) == 16_000
    assert all(room % 8 == rank for rank, batch in enumerate(per_task) for room in batch)
    assert fresh_server.calls("AllocateRoom") == 0
    assert fresh_server.calls("LeaseRooms") <= 10


def test_async_refill_runs_as_a_background_task(fresh_server: Server) -> None:
    async def main() -> None:
        async with AsyncRoomClient(fresh_server.address) as client:
            await client.register("prefill-0", 1)
            for _ in range(129):  # the first lease has 256 bases: half used
                await client.allocate("prefill-0", 0, 1)
            assert fresh_server.calls("LeaseRooms") == 1
            assert await wait_until(lambda: fresh_server.calls("LeaseRooms") == 2)
            # The refill is in: the lease now covers more than the first block's rest.
            assert client.try_allocate("prefill-0", 0, 1) is not None

    run(main())


def test_async_typed_errors(server: Server, worker: str) -> None:
    async def main() -> None:
        async with AsyncRoomClient(server.address) as client:
            with pytest.raises(WorkerNotFound):
                await client.lease_rooms(worker, 5, 2)
            await client.register(worker, 2)
            with pytest.raises(DpSizeMismatch) as raised:
                await client.allocate(worker, 0, 4)
            assert (raised.value.registered, raised.value.requested, raised.value.worker) == (2, 4, worker)
            assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(ValueError):
                await client.allocate(worker, 2, 2)
            allocated = await client.allocate_room(worker, 1, 2)
            assert allocated == AllocatedRoom(allocated.room, 2) and allocated.room % 2 == 1
            lease = await client.lease_rooms(worker, 7, 2)
            assert lease.count == 7 and lease.first_base % 2 == 0
            await client.deregister(worker)
            with pytest.raises(WorkerDeregistered):
                await client.allocate(worker, 1, 2)

    run(main())


def test_async_lease_expiry_picks_up_a_realignment(server: Server, worker: str) -> None:
    async def main() -> None:
        async with AsyncRoomClient(server.address, max_lease_age=0.4) as router:
            async with AsyncRoomClient(server.address) as admin:
                await admin.register(worker, 2)
                first = await router.allocate(worker, 0, 2)
                await admin.register(worker, 3)
                assert await router.allocate(worker, 0, 2) == first + 2  # still leased
                await asyncio.sleep(0.5)
                with pytest.raises(DpSizeMismatch) as raised:
                    await router.allocate(worker, 0, 2)
                assert raised.value.registered == 3
                room = await router.allocate(worker, 2, 3)
                assert await router.resolve(room) == Resolved(worker, 2, 3)

    run(main())


def test_async_workers_pages_and_close(fresh_server: Server) -> None:
    names = [f"async-{i:04d}" for i in range(1100)]

    async def main() -> AsyncRoomClient:
        async with AsyncRoomClient(fresh_server.address) as client:
            limit = asyncio.Semaphore(64)

            async def register(name: str) -> None:
                async with limit:
                    await client.register(name, 2)

            await asyncio.gather(*(register(name) for name in names))
            workers = await client.workers()
            assert [w.prefill_worker for w in workers] == names
            for _ in range(200):  # a background refill task is started
                await client.allocate(names[0], 1, 2)
        assert client.closed
        with pytest.raises(ValueError, match="closed"):
            await client.allocate(names[0], 1, 2)
        with pytest.raises(ValueError, match="closed"):
            await client.workers()
        await client.close()  # idempotent
        return client

    client = run(main())
    assert not client._refills  # close() ended the refill tasks
    assert fresh_server.calls("ListWorkers") == 2
