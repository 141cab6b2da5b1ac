"""A client used across ``fork()`` (gunicorn or uvicorn workers,
multiprocessing with the fork start method): the child and its parent never
get the same room, however the child was forked and whichever client it uses.

Each test forks for real, lets child and parent allocate from the one client
object they share, collects the child's rooms through a pipe and checks that
all rooms are distinct and that the child's rooms resolve (the child leased
them from the server, not from memory it copied).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import select
import signal
import threading
import time
import traceback
from typing import Awaitable, Callable, List, TypeVar

import pytest

import room_allocator._fork
from room_allocator import AsyncRoomClient, Resolved, RoomAllocatorError, RoomClient

from conftest import Server

T = TypeVar("T")

DP_SIZE = 4
#: Rooms taken before the fork: the client then holds leased blocks, which
#: the fork copies into the child, and has run a background refill (its
#: thread or task exists in the parent, not in the child).
ROOMS_BEFORE_FORK = 200
#: Rooms each side takes after the fork: fewer than half a first lease, so a
#: client that kept the copied block would serve them all from it.
ROOMS_AFTER_FORK = 40
#: Seconds a child may take; a child that hangs (on a lock or a channel it
#: copied) is killed and the test fails.
CHILD_TIMEOUT = 20.0
START_METHODS = ["os.fork", "multiprocessing-fork"]


class Child:
    """A forked child that sends back a JSON list (of rooms, mostly)."""

    def __init__(self, pid: int, read_rooms: Callable[[float], str], reap: Callable[[], None]) -> None:
        self.pid = pid
        self._read_rooms = read_rooms
        self._reap = reap

    def rooms(self) -> List[int]:
        try:
            text = self._read_rooms(CHILD_TIMEOUT)
        finally:
            self._reap()
        rooms = json.loads(text)
        assert isinstance(rooms, list), f"the child failed: {rooms}"
        return rooms


def _child_main(work: Callable[[], List[int]], send: Callable[[str], None]) -> None:
    try:
        result: object = work()
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        result = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
    send(json.dumps(result))


def fork_child(start: str, work: Callable[[], List[int]]) -> Child:
    """Runs ``work`` in a child forked by ``os.fork()`` or by a
    multiprocessing ``Process`` of the fork start method."""
    if start == "os.fork":
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(read_fd)

                def send(text: str) -> None:
                    with os.fdopen(write_fd, "w") as out:
                        out.write(text)

                _child_main(work, send)
                status = 0
            finally:
                # Never return into pytest in the child.
                os._exit(status)
        os.close(write_fd)

        def read(timeout: float) -> str:
            chunks = []
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                    raise AssertionError(f"the forked child sent no rooms within {timeout} s")
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    return b"".join(chunks).decode()
                chunks.append(chunk)

        def reap() -> None:
            os.close(read_fd)
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)

        return Child(pid, read, reap)

    assert start == "multiprocessing-fork"
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(work, sender.send), daemon=True)
    process.start()
    sender.close()

    def receive(timeout: float) -> str:
        if not receiver.poll(timeout):
            raise AssertionError(f"the multiprocessing child sent no rooms within {timeout} s")
        text = receiver.recv()
        assert isinstance(text, str)
        return text

    def join() -> None:
        receiver.close()
        # A child that sent its rooms exits at once; one that did not is stuck.
        process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join()

    assert process.pid is not None
    return Child(process.pid, receive, join)


def in_new_event_loop(coroutine: Callable[[], Awaitable[T]]) -> T:
    """Runs ``coroutine()`` in a new event loop on a new thread. A child
    forked inside a running loop still has that loop marked running in the
    forking thread (and shares its epoll descriptor with the parent), so the
    child runs its own loop elsewhere, as a forked worker process would."""
    results: List[T] = []
    errors: List[BaseException] = []

    def run() -> None:
        try:
            results.append(asyncio.run(asyncio.wait_for(coroutine(), CHILD_TIMEOUT)))
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def refilling(client: RoomClient | AsyncRoomClient, worker: str) -> bool:
    return client._leases.worker(worker).refilling


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "a background refill did not end"
        time.sleep(0.005)


def check_distinct(before: List[int], parent: List[int], child: List[int]) -> None:
    shared = sorted(set(parent) & set(child))
    assert not shared, f"parent and child both got rooms {shared[:5]} ({len(shared)} of {len(child)})"
    rooms = before + parent + child
    assert len(set(rooms)) == len(rooms), "a room was handed out twice"
    for i, room in enumerate(parent):
        assert room % DP_SIZE == i % DP_SIZE
    for i, room in enumerate(child):
        assert room % DP_SIZE == i % DP_SIZE


@pytest.mark.parametrize("start", START_METHODS)
def test_a_forked_child_and_its_parent_never_get_the_same_room(server: Server, worker: str, start: str) -> None:
    with RoomClient(server.address) as client:
        client.register(worker, DP_SIZE)
        before = [client.allocate(worker, i % DP_SIZE, DP_SIZE) for i in range(ROOMS_BEFORE_FORK)]
        # Fork between calls (README): forked while a call is in flight,
        # gRPC may hang in the child ("Other threads are currently calling
        # into gRPC, skipping fork() handlers"), whatever the client does.
        wait_until(lambda: not refilling(client, worker))

        child = fork_child(start, lambda: [client.allocate(worker, i % DP_SIZE, DP_SIZE) for i in range(ROOMS_AFTER_FORK)])
        parent = [client.allocate(worker, i % DP_SIZE, DP_SIZE) for i in range(ROOMS_AFTER_FORK)]
        child_rooms = child.rooms()

        check_distinct(before, parent, child_rooms)
        assert client.resolve(child_rooms[-1]) == Resolved(worker, (ROOMS_AFTER_FORK - 1) % DP_SIZE, DP_SIZE)


@pytest.mark.skipif(
    room_allocator._fork.grpcio_version() < room_allocator._fork.FIRST_GRPCIO_SAFE_AFTER_AIO_FORK,
    reason="with this grpcio the child refuses to call (tested by the next test)",
)
@pytest.mark.parametrize("start", START_METHODS)
def test_a_forked_child_and_its_parent_never_get_the_same_room_async(server: Server, worker: str, start: str) -> None:
    async def allocate_many(client: AsyncRoomClient) -> List[int]:
        return [await client.allocate(worker, i % DP_SIZE, DP_SIZE) for i in range(ROOMS_AFTER_FORK)]

    async def main() -> None:
        async with AsyncRoomClient(server.address) as client:
            await client.register(worker, DP_SIZE)
            before = [await client.allocate(worker, i % DP_SIZE, DP_SIZE) for i in range(ROOMS_BEFORE_FORK)]
            while refilling(client, worker):  # fork between calls, as above
                await asyncio.sleep(0.005)

            # Forked inside the parent's running loop, as a process started
            # from a request handler is.
            child = fork_child(start, lambda: in_new_event_loop(lambda: allocate_many(client)))
            parent = await allocate_many(client)
            child_rooms = await asyncio.to_thread(child.rooms)

            check_distinct(before, parent, child_rooms)
            resolved = await client.resolve(child_rooms[-1])
            assert resolved == Resolved(worker, (ROOMS_AFTER_FORK - 1) % DP_SIZE, DP_SIZE)

    asyncio.run(asyncio.wait_for(main(), CHILD_TIMEOUT * 2))


@pytest.mark.parametrize("start", START_METHODS)
def test_a_child_forked_while_another_thread_leases_does_not_wait_for_that_thread(
    server: Server, worker: str, start: str
) -> None:
    with RoomClient(server.address) as client:
        client.register(worker, DP_SIZE)
        # Another thread of the parent holds the worker's refill lock at the
        # fork, as while it waits for a LeaseRooms answer. The child copies
        # the lock held, without the thread that would release it.
        refill_lock = client._leases.worker(worker).refill_lock
        holding, release = threading.Event(), threading.Event()

        def lease_in_flight() -> None:
            with refill_lock:
                holding.set()
                release.wait(CHILD_TIMEOUT)

        thread = threading.Thread(target=lease_in_flight)
        thread.start()
        try:
            assert holding.wait(CHILD_TIMEOUT)
            child = fork_child(start, lambda: [client.allocate(worker, i % DP_SIZE, DP_SIZE) for i in range(ROOMS_AFTER_FORK)])
        finally:
            release.set()
            thread.join()
        parent = [client.allocate(worker, i % DP_SIZE, DP_SIZE) for i in range(ROOMS_AFTER_FORK)]
        child_rooms = child.rooms()

        check_distinct([], parent, child_rooms)


def test_with_a_grpcio_before_1_81_a_child_of_a_grpc_aio_process_refuses_to_call(server: Server, worker: str) -> None:
    """With grpcio before 1.81, gRPC calls in a child forked while a grpc.aio
    channel was open hung or crashed the parent (see room_allocator._fork):
    there the child's clients fail at once instead. The installed grpcio is
    newer, so the child is told it is 1.78."""

    async def attempts() -> List[str]:
        outcomes = []
        try:
            outcomes.append(f"allocated {await client.allocate(worker, 0, DP_SIZE)}")
        except RoomAllocatorError as error:
            outcomes.append(error.code.name)
        try:
            async with AsyncRoomClient(server.address) as own:
                outcomes.append(f"allocated {await own.allocate(worker, 0, DP_SIZE)}")
        except RoomAllocatorError as error:
            outcomes.append(error.code.name)
        return outcomes

    def child_work() -> List[str]:
        room_allocator._fork.grpcio_version = lambda: (1, 78)  # in the child only
        return in_new_event_loop(attempts)

    async def main() -> None:
        nonlocal client
        async with AsyncRoomClient(server.address) as client:
            await client.register(worker, DP_SIZE)
            await client.allocate(worker, 0, DP_SIZE)
            child = fork_child("os.fork", child_work)  # type: ignore[arg-type]
            outcomes = await asyncio.to_thread(child.rooms)
            assert outcomes == ["FAILED_PRECONDITION", "FAILED_PRECONDITION"], outcomes

    client: AsyncRoomClient
    asyncio.run(asyncio.wait_for(main(), CHILD_TIMEOUT * 2))
