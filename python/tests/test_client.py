"""RoomClient against the real server: rooms, leases, workers, errors."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from room_allocator import (
    MAX_ROOM,
    AllocatedRoom,
    DpSizeMismatch,
    Lease,
    Resolved,
    RoomAllocatorError,
    RoomClient,
    RoomNotFound,
    Unavailable,
    WorkerDeregistered,
    WorkerInfo,
    WorkerNotFound,
)

from conftest import Server


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_register_returns_the_worker_as_registered(server: Server, worker: str) -> None:
    with RoomClient(server.address) as client:
        info = client.register(worker, 4)
        assert info == WorkerInfo(prefill_worker=worker, dp_size=4, rooms_issued=0)
        assert client.register(worker, 4).dp_size == 4  # idempotent


@pytest.mark.parametrize("dp_size", [1, 2, 3, 8, 16])
def test_allocated_rooms_are_unique_rank_aligned_and_resolve(server: Server, worker: str, dp_size: int) -> None:
    with RoomClient(server.address) as client:
        client.register(worker, dp_size)
        rooms = [(client.allocate(worker, i % dp_size, dp_size), i % dp_size) for i in range(3000)]
        assert len({room for room, _ in rooms}) == len(rooms)
        for room, rank in rooms:
            assert 1 <= room <= MAX_ROOM and room % dp_size == rank
        for room, rank in rooms[:: len(rooms) // 10]:
            assert client.resolve(room) == Resolved(worker, rank, dp_size)


def test_allocate_leases_instead_of_one_call_per_room(fresh_server: Server) -> None:
    with RoomClient(fresh_server.address) as client:
        client.register("prefill-0", 8)
        rooms = {client.allocate("prefill-0", 5, 8) for _ in range(20_000)}
        assert len(rooms) == 20_000
    assert fresh_server.calls("AllocateRoom") == 0
    # Lease sizes double while leases run out within a second: 256, 512, ...
    assert 1 <= fresh_server.calls("LeaseRooms") <= 10


def test_a_refill_starts_in_the_background_when_half_the_lease_is_used(fresh_server: Server) -> None:
    with RoomClient(fresh_server.address) as client:
        client.register("prefill-0", 2)
        client.allocate("prefill-0", 0, 2)  # leases the first block, of 256 bases
        assert fresh_server.calls("LeaseRooms") == 1
        for _ in range(127):
            client.allocate("prefill-0", 1, 2)
        # 128 bases left = half the lease: the next room starts a refill
        # without waiting for it.
        assert client.try_allocate("prefill-0", 1, 2) is not None
        assert wait_until(lambda: fresh_server.calls("LeaseRooms") == 2)
        time.sleep(0.2)
        assert fresh_server.calls("LeaseRooms") == 2  # one refill in flight, not one per room


def test_dp_rank_out_of_range_raises_value_error_without_a_call(fresh_server: Server) -> None:
    with RoomClient(fresh_server.address) as client:
        for rank, size in [(4, 4), (-1, 4), (0, 0)]:
            with pytest.raises(ValueError, match="out of range"):
                client.allocate("prefill-0", rank, size)
        assert client.try_allocate("prefill-0", 4, 4) is None
    assert sum(fresh_server.metrics().values()) == 0


def test_allocate_registers_a_never_registered_worker_through_allocate_room(fresh_server: Server) -> None:
    with RoomClient(fresh_server.address) as client:
        room = client.allocate("prefill-new", 2, 3)  # LeaseRooms: NOT_FOUND, then AllocateRoom
        assert room % 3 == 2
        assert fresh_server.calls("LeaseRooms", "NOT_FOUND") == 1
        assert fresh_server.calls("AllocateRoom") == 1
        assert client.workers() == [WorkerInfo("prefill-new", 3, 1)]
        # Registered now: later rooms come from a lease.
        rooms = {client.allocate("prefill-new", 1, 3) for _ in range(500)}
        assert len(rooms) == 500 and room not in rooms
        assert fresh_server.calls("AllocateRoom") == 1
        assert fresh_server.calls("LeaseRooms") >= 1


def test_dp_size_mismatch_carries_the_registered_size(server: Server, worker: str) -> None:
    with RoomClient(server.address) as client:
        client.register(worker, 4)
        with pytest.raises(DpSizeMismatch) as raised:
            client.allocate(worker, 1, 8)
        error = raised.value
        assert (error.worker, error.registered, error.requested) == (worker, 4, 8)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "DP_SIZE_MISMATCH"
        assert not error.retryable
        # The raw calls type their errors alike.
        with pytest.raises(DpSizeMismatch) as raw:
            client.allocate_room(worker, 1, 2)
        assert raw.value.registered == 4 and raw.value.requested == 2
        with pytest.raises(DpSizeMismatch):
            client.lease_rooms(worker, 10, 2)


def test_register_with_another_dp_size_drops_the_lease(server: Server, worker: str) -> None:
    with RoomClient(server.address) as client:
        client.register(worker, 2)
        old = client.allocate(worker, 1, 2)
        client.register(worker, 4)
        # Not served from the dropped dp_size 2 lease: asked of the server.
        with pytest.raises(DpSizeMismatch) as raised:
            client.allocate(worker, 1, 2)
        assert raised.value.registered == 4
        room = client.allocate(worker, 3, 4)
        assert room % 4 == 3
        assert client.resolve(room) == Resolved(worker, 3, 4)
        assert client.resolve(old) == Resolved(worker, 1, 2)  # earlier rooms keep their size


def test_deregister_drops_the_lease_and_register_brings_the_worker_back(server: Server, worker: str) -> None:
    with RoomClient(server.address) as client:
        client.register(worker, 2)
        room = client.allocate(worker, 0, 2)
        client.deregister(worker)
        with pytest.raises(WorkerDeregistered) as raised:
            client.allocate(worker, 0, 2)
        assert raised.value.worker == worker and raised.value.reason == "WORKER_DEREGISTERED"
        # Whatever dp_size the caller passes.
        with pytest.raises(WorkerDeregistered):
            client.allocate(worker, 0, 5)
        assert client.resolve(room).prefill_worker == worker  # its rooms still resolve
        assert worker not in {info.prefill_worker for info in client.workers()}
        client.register(worker, 2)
        assert client.allocate(worker, 1, 2) % 2 == 1


def test_a_lease_expires_so_a_realignment_by_another_router_is_picked_up(server: Server, worker: str) -> None:
    with RoomClient(server.address, max_lease_age=0.5) as router, RoomClient(server.address) as admin:
        admin.register(worker, 2)
        before = router.allocate(worker, 1, 2)
        admin.register(worker, 4)
        # Still within the lease: this router does not know yet.
        assert router.allocate(worker, 1, 2) == before + 2
        time.sleep(0.6)
        with pytest.raises(DpSizeMismatch) as raised:
            router.allocate(worker, 1, 2)
        assert raised.value.registered == 4
        # The router refreshes its view and carries on with the new size.
        room = router.allocate(worker, 3, 4)
        assert router.resolve(room) == Resolved(worker, 3, 4)


def test_a_new_dp_size_from_the_caller_drops_the_old_lease(server: Server, worker: str) -> None:
    with RoomClient(server.address) as router, RoomClient(server.address) as admin:
        admin.register(worker, 2)
        router.allocate(worker, 0, 2)
        admin.register(worker, 6)
        assert router.allocate(worker, 5, 6) % 6 == 5
        # Back to the old size: the old lease is gone, so the server refuses.
        with pytest.raises(DpSizeMismatch):
            router.allocate(worker, 0, 2)


def test_raw_lease_rooms_and_allocate_room(server: Server, worker: str) -> None:
    with RoomClient(server.address) as client:
        client.register(worker, 4)
        lease = client.lease_rooms(worker, 100, 4)
        assert isinstance(lease, Lease)
        assert (lease.count, lease.dp_size) == (100, 4) and lease.valid_for_ms > 0
        assert lease.first_base % 4 == 0 and len(lease.bases()) == 100
        assert client.resolve(lease.bases()[-1] + 3) == Resolved(worker, 3, 4)
        allocated = client.allocate_room(worker, 2)  # dp_size 0: as registered
        assert allocated == AllocatedRoom(allocated.room, 4) and allocated.room % 4 == 2
        assert allocated.room not in set(lease.bases())
        with pytest.raises(RoomAllocatorError) as raised:
            client.lease_rooms(worker, 1_000_001, 4)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.reason == "INVALID_ARGUMENT"


def test_not_found_errors_are_typed(server: Server, worker: str) -> None:
    with RoomClient(server.address) as client:
        with pytest.raises(WorkerNotFound) as raised:
            client.lease_rooms(worker, 10, 2)
        assert raised.value.worker == worker and raised.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(WorkerNotFound):
            client.deregister(worker)
        with pytest.raises(RoomNotFound) as missing:
            client.resolve(MAX_ROOM)
        assert missing.value.reason == "ROOM_NOT_FOUND" and not missing.value.pruned


def test_an_unreachable_server_raises_unavailable(tmp_path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with RoomClient(f"127.0.0.1:{port}", timeout=2) as client:
        with pytest.raises(Unavailable) as raised:
            client.allocate("prefill-0", 0, 1)  # LeaseRooms fails, so does AllocateRoom
        assert raised.value.retryable and raised.value.reason is None
        with pytest.raises(Unavailable):
            client.register("prefill-0", 1)


def test_threads_sharing_one_client_never_get_the_same_room(server: Server, worker: str) -> None:
    with RoomClient(server.address) as client:
        client.register(worker, 4)

        def allocate(rank: int) -> list:
            return [client.allocate(worker, rank, 4) for _ in range(4000)]

        with ThreadPoolExecutor(8) as pool:
            per_thread = list(pool.map(allocate, [i % 4 for i in range(8)]))
    rooms = [room for batch in per_thread for room in batch]
    assert len(set(rooms)) == len(rooms) == 32_000
    for i, batch in enumerate(per_thread):
        assert all(room % 4 == i % 4 for room in batch)


def test_workers_pages_through_more_than_a_thousand(fresh_server: Server) -> None:
    names = [f"paged-{i:05d}" for i in range(1234)]
    with RoomClient(fresh_server.address) as client:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda name: client.register(name, 1 + len(name) % 3), names))
        workers = client.workers()
    assert [w.prefill_worker for w in workers] == names  # sorted by name, none twice
    assert all(w.dp_size == 1 + len(w.prefill_worker) % 3 for w in workers)
    assert fresh_server.calls("ListWorkers") == 2


def test_the_context_manager_closes_the_client(server: Server, worker: str) -> None:
    with RoomClient(server.address) as client:
        client.register(worker, 2)
        for _ in range(200):  # past half the lease: a refill thread ran
            client.allocate(worker, 0, 2)
    assert client.closed
    # close() waited for the refill thread.
    assert not any(t.name.startswith("room-allocator-refill") for t in threading.enumerate())
    with pytest.raises(ValueError, match="closed"):
        client.allocate(worker, 0, 2)  # not even from the lease
    with pytest.raises(ValueError, match="closed"):
        client.resolve(1)
    assert client.try_allocate(worker, 0, 2) is None
    client.close()  # idempotent


def test_targets_as_urls(server: Server, worker: str) -> None:
    with RoomClient(f"http://{server.address}") as client:
        assert client.register(worker, 1).dp_size == 1
    with pytest.raises(ValueError):
        RoomClient("http://127.0.0.1:1/path")
    with pytest.raises(ValueError, match="mutual TLS"):
        RoomClient("127.0.0.1:1", private_key=b"key")
    with pytest.raises(ValueError, match="max_lease_age"):
        RoomClient("127.0.0.1:1", max_lease_age=0)
