"""``RoomClient``: the blocking client, for routers built on threads."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from types import TracebackType
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Type, TypeVar

import grpc

from ._channel import DEFAULT_TIMEOUT, WORKERS_PAGE_SIZE, ChannelOptions, channel_spec
from ._fork import keep_inherited, track
from ._fallback import DEFAULT_ALLOCATION_DEADLINE, Fallback, FallbackCallback, is_outage
from ._lease import (
    BLOCK_ATTEMPTS,
    DEFAULT_MAX_LEASE_AGE,
    LeaseBook,
    WorkerLease,
    check_allocated,
    check_block,
    check_rank,
    max_lease_count,
)
from ._pb import room_allocator_pb2 as pb
from ._pb.room_allocator_pb2_grpc import RoomAllocatorServiceStub
from ._types import AllocatedRoom, Lease, Resolved, RoomSpace, WorkerInfo
from .errors import DpSizeMismatch, RoomAllocatorError, WorkerDeregistered, from_rpc_error

__all__ = ["RoomClient"]

log = logging.getLogger("room_allocator")

_Response = TypeVar("_Response")


class RoomClient:
    """A thread-safe client of one room-allocator server.

    :meth:`allocate` makes rooms from leased bases (LeaseRooms) with no call
    per room; a background thread refills a worker's lease when half of it
    is used. The other methods are one call each.

    ``target`` is ``host:port``; with ``root_certificates`` (PEM) the channel
    uses TLS, and with ``private_key`` and ``certificate_chain`` (PEM) too,
    mutual TLS. ``https://host:port`` means TLS with the system's roots
    unless ``root_certificates`` is given; ``http://host:port`` plaintext.
    ``token`` is sent as ``authorization: Bearer <token>`` on every call, on
    plaintext channels too. ``timeout`` is each call's deadline in seconds;
    ``max_lease_age`` bounds how long a leased base is kept (see README);
    ``tls_server_name`` overrides the name the server's certificate is
    checked against; ``options`` are extra grpc channel options.

    ``fallback_region=(start, end)`` opts in to the outage fallback: when no
    leased room is left and the allocator does not answer within
    ``allocation_deadline`` seconds, the allocate methods return a
    rank-aligned random room from ``start..=end``, which must be disjoint
    from the server's rooms (GetRoomSpace; checked by :meth:`warm_up` or the
    first lease, ValueError when it overlaps). Each fallback room is counted
    (:attr:`fallback_rooms`) and passed to ``on_fallback`` (cheap, must not
    block). See README, "Outage fallback", for the odds of a collision.

    Use it as a context manager, or call :meth:`close`.

    A child forked from a process using the client (``os.fork()``,
    multiprocessing's fork start method, gunicorn workers) keeps none of the
    parent's leases and makes a channel of its own on its first call (see
    README, "Forked processes").
    """

    def __init__(
        self,
        target: str,
        *,
        token: Optional[str] = None,
        root_certificates: Optional[bytes] = None,
        private_key: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        tls_server_name: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_lease_age: float = DEFAULT_MAX_LEASE_AGE,
        options: ChannelOptions = (),
        fallback_region: Optional[Tuple[int, int]] = None,
        allocation_deadline: float = DEFAULT_ALLOCATION_DEADLINE,
        on_fallback: Optional[FallbackCallback] = None,
    ) -> None:
        self._fallback = (
            None if fallback_region is None else Fallback(fallback_region, allocation_deadline, on_fallback)
        )
        spec = channel_spec(
            target,
            token=token,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            tls_server_name=tls_server_name,
            options=options,
        )
        self._max_lease_age = max_lease_age
        self._leases = self._new_lease_book()
        self._spec = spec
        self._channel: Optional[grpc.Channel] = None
        self._channel_stub: Optional[RoomAllocatorServiceStub] = None
        self._channel_lock = threading.Lock()
        self._metadata = spec.metadata
        self._timeout = timeout
        self._executor: Optional[ThreadPoolExecutor] = None
        self._executor_lock = threading.Lock()
        self._closed = False
        self._connect()
        track(self)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Closes the channel (cancelling calls in flight) and waits for the
        background refill thread. Idempotent; later calls raise ValueError."""
        with self._executor_lock:
            if self._closed:
                return
            self._closed = True
            executor, self._executor = self._executor, None
        with self._channel_lock:
            channel = self._channel
        if channel is not None:
            channel.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RoomClient:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- rooms -------------------------------------------------------------

    def allocate(self, prefill_worker: str, dp_rank: int, dp_size: int) -> int:
        """A room for (``prefill_worker``, ``dp_rank``) aligned to
        ``dp_size``, the size the router believes the worker has:
        ``room % dp_size == dp_rank``.

        From the lease when it can (no call), else after leasing, else by
        one AllocateRoom (which registers a worker that was never registered,
        if the server lets this client). Raises :class:`DpSizeMismatch` when
        the worker is registered with another dp_size, and
        :class:`WorkerDeregistered` when it was deregistered; ValueError,
        without a call, when ``dp_rank`` is not in ``0..dp_size-1``.
        """
        if self._closed:
            raise ValueError("the RoomClient is closed")
        check_rank(dp_rank, dp_size)
        room = self._leases.take(prefill_worker, dp_rank, dp_size)
        if room is not None:
            return room
        worker = self._leases.worker(prefill_worker)
        with worker.refill_lock:
            # A refill may have finished while this caller waited for it.
            room = self._leases.take(prefill_worker, dp_rank, dp_size)
            if room is not None:
                return room
            self._leases.realign(worker, dp_size)
            failure = self._refill_inline(worker, dp_size, 1)
        room = self._leases.take(prefill_worker, dp_rank, dp_size)
        if room is not None:
            return room
        if failure is not None and self._outage(failure):
            return self._fallback_room(prefill_worker, dp_rank, dp_size, 1, failure)
        return self._allocate_one(prefill_worker, dp_rank, dp_size)

    def allocate_many(self, prefill_worker: str, dp_ranks: Sequence[int], dp_size: int) -> List[int]:
        """A room for each rank of ``dp_ranks``, in order (``rooms[i] %
        dp_size == dp_ranks[i]``), for a batch: one lease take for the whole
        batch, at most one LeaseRooms of at least the batch's size. Raises
        as :meth:`allocate`; ValueError, without a call, for a rank out of
        range."""
        if self._closed:
            raise ValueError("the RoomClient is closed")
        ranks = list(dp_ranks)
        for dp_rank in ranks:
            check_rank(dp_rank, dp_size)
        rooms = self._leases.take_many(prefill_worker, ranks, dp_size)
        if len(rooms) == len(ranks):
            return rooms
        worker = self._leases.worker(prefill_worker)
        failure: Optional[RoomAllocatorError] = None
        with worker.refill_lock:
            rooms += self._leases.take_many(prefill_worker, ranks[len(rooms) :], dp_size)
            if len(rooms) < len(ranks):
                self._leases.realign(worker, dp_size)
                needed = min(len(ranks) - len(rooms), max_lease_count(dp_size))
                failure = self._refill_inline(worker, dp_size, needed)
                rooms += self._leases.take_many(prefill_worker, ranks[len(rooms) :], dp_size)
        for dp_rank in ranks[len(rooms) :]:
            if failure is not None and self._outage(failure):
                rooms.append(self._fallback_room(prefill_worker, dp_rank, dp_size, 1, failure))
            else:
                rooms.append(self.allocate(prefill_worker, dp_rank, dp_size))
        return rooms

    def allocate_block(self, prefill_worker: str, first_rank: int, num: int, dp_size: int) -> int:
        """The first room of ``num`` consecutive numbers no one else gets:
        item ``i`` of a request is ``room + i``, on rank ``(first_rank + i)
        % dp_size``. This is what SGLang needs for one ``bootstrap_room``
        sent with a request of ``num`` items (batch size times
        ``sampling_params.n``), which it expands to ``room + i`` (see
        docs/integration.md). Takes ``ceil((first_rank + num) / dp_size)``
        consecutive leased bases. Raises as :meth:`allocate`; ValueError,
        without a call, for a rank out of range or a block larger than one
        lease."""
        if self._closed:
            raise ValueError("the RoomClient is closed")
        bases = check_block(first_rank, num, dp_size)
        room = self._leases.take_block(prefill_worker, first_rank, num, dp_size)
        if room is not None:
            return room
        worker = self._leases.worker(prefill_worker)
        failure: Optional[RoomAllocatorError] = None
        # Bounded: each round leases at least the block's bases; only
        # concurrent takers between the lease and the take make it short.
        for _ in range(BLOCK_ATTEMPTS):
            with worker.refill_lock:
                room = self._leases.take_block(prefill_worker, first_rank, num, dp_size)
                if room is not None:
                    return room
                self._leases.realign(worker, dp_size)
                failure = self._refill_inline(worker, dp_size, bases)
                room = self._leases.take_block(prefill_worker, first_rank, num, dp_size)
                if room is not None:
                    return room
            if failure is not None:
                break
        if failure is not None and self._outage(failure):
            return self._fallback_room(prefill_worker, first_rank, dp_size, num, failure)
        raise failure or RoomAllocatorError(
            grpc.StatusCode.UNAVAILABLE,
            f"no lease of {prefill_worker!r} held {bases} consecutive bases after {BLOCK_ATTEMPTS} leases; retry",
        )

    def try_allocate(self, prefill_worker: str, dp_rank: int, dp_size: int) -> Optional[int]:
        """A room from the lease with no call and no wait, or ``None`` when
        the lease is empty, expired or of another dp_size (then call
        :meth:`allocate`). Starts a background refill when the lease runs low."""
        if self._closed or not 0 <= dp_rank < dp_size:
            return None
        return self._leases.take(prefill_worker, dp_rank, dp_size)

    def allocate_room(self, prefill_worker: str, dp_rank: int, dp_size: int = 0) -> AllocatedRoom:
        """One raw AllocateRoom call, no lease. ``dp_size`` 0 means "as
        registered"; another value registers a worker never registered (an
        admin act when the server has a token) and is refused with
        :class:`DpSizeMismatch` when it differs from the registered size."""
        response = self._call(
            self._stub.AllocateRoom,
            pb.AllocateRoomRequest(prefill_worker=prefill_worker, dp_rank=dp_rank, dp_size=dp_size),
            prefill_worker,
            dp_size,
        )
        return check_allocated(AllocatedRoom(response.room, response.dp_size), dp_rank, dp_size)

    def lease_rooms(self, prefill_worker: str, count: int, dp_size: int = 0) -> Lease:
        """One raw LeaseRooms call, not kept by the client: for tools and
        routers that manage their own leases. ``dp_size`` 0 means "as
        registered"; LeaseRooms never registers a worker."""
        return self._lease_rooms(prefill_worker, count, dp_size, self._timeout)

    def _lease_rooms(self, prefill_worker: str, count: int, dp_size: int, timeout: float) -> Lease:
        response = self._call(
            self._stub.LeaseRooms,
            pb.LeaseRoomsRequest(prefill_worker=prefill_worker, count=count, dp_size=dp_size),
            prefill_worker,
            dp_size,
            timeout=timeout,
        )
        return Lease(response.first_base, response.count, response.dp_size, response.valid_for_ms)

    def room_space(self) -> RoomSpace:
        """The rooms the server hands out (GetRoomSpace). With a fallback
        region, checks it is disjoint from them (ValueError otherwise)."""
        return self._room_space(self._timeout)

    def _room_space(self, timeout: float) -> RoomSpace:
        response = self._call(self._stub.GetRoomSpace, pb.GetRoomSpaceRequest(), timeout=timeout)
        space = RoomSpace(response.min_room, response.max_room)
        if self._fallback is not None:
            self._fallback.learn(space)
        return space

    def warm_up(self, workers: Iterable[Tuple[str, int]] = ()) -> RoomSpace:
        """Connects now (GetRoomSpace, which also checks the fallback region)
        and leases for each ``(prefill_worker, dp_size)`` of ``workers``, so
        that the first requests pay neither the connect nor a lease. Raises
        what the calls raise."""
        space = self.room_space()
        for prefill_worker, dp_size in workers:
            worker = self._leases.worker(prefill_worker)
            with worker.refill_lock:
                self._leases.realign(worker, dp_size)
                if self._leases.available(prefill_worker) == 0:
                    self._refill_locked(worker, dp_size)
        return space

    @property
    def fallback_rooms(self) -> int:
        """Fallback rooms handed out so far (0 without a fallback region)."""
        return 0 if self._fallback is None else self._fallback.rooms

    def resolve(self, room: int) -> Resolved:
        """Which worker, rank and dp_size ``room`` was issued for."""
        response = self._call(self._stub.ResolveRank, pb.ResolveRankRequest(room=room))
        return Resolved(response.prefill_worker, response.dp_rank, response.dp_size)

    # -- workers -----------------------------------------------------------

    def register(self, prefill_worker: str, dp_size: int) -> WorkerInfo:
        """Registers (or realigns) a prefill worker; an admin call when the
        server has a token. A lease of another dp_size is dropped."""
        response = self._call(
            self._stub.RegisterWorker,
            pb.RegisterWorkerRequest(prefill_worker=prefill_worker, dp_size=dp_size),
            prefill_worker,
            dp_size,
        )
        self._leases.drop(prefill_worker, unless_dp_size=dp_size)
        if not response.HasField("worker"):
            raise RoomAllocatorError(grpc.StatusCode.INTERNAL, "the server sent no worker")
        return WorkerInfo._from_pb(response.worker)

    def deregister(self, prefill_worker: str) -> None:
        """Stops new rooms for a worker until it is registered again (its
        rooms still resolve); an admin call when the server has a token.
        The worker's lease is dropped."""
        self._call(
            self._stub.DeregisterWorker,
            pb.DeregisterWorkerRequest(prefill_worker=prefill_worker),
            prefill_worker,
        )
        self._leases.drop(prefill_worker)

    def workers(self) -> List[WorkerInfo]:
        """Every registered worker, sorted by name (pages through ListWorkers)."""
        workers: List[WorkerInfo] = []
        page_token = ""
        while True:
            page = self._call(
                self._stub.ListWorkers,
                pb.ListWorkersRequest(page_size=WORKERS_PAGE_SIZE, page_token=page_token),
            )
            workers.extend(WorkerInfo._from_pb(info) for info in page.workers)
            if not page.next_page_token:
                return workers
            if page.next_page_token == page_token:
                raise RoomAllocatorError(grpc.StatusCode.INTERNAL, "the server returned the same page token twice")
            page_token = page.next_page_token

    # -- internals ---------------------------------------------------------

    def _new_lease_book(self) -> LeaseBook:
        return LeaseBook(
            max_lease_age=self._max_lease_age,
            new_refill_lock=threading.Lock,
            start_refill=self._start_refill,
        )

    def _connect(self) -> RoomAllocatorServiceStub:
        """The stub of the client's channel, made now if there is none (at
        creation, and on the first call of a forked child)."""
        with self._channel_lock:
            if self._closed:
                raise ValueError("the RoomClient is closed")
            if self._channel_stub is None:
                spec = self._spec
                if spec.credentials is None:
                    self._channel = grpc.insecure_channel(spec.address, options=spec.options)
                else:
                    self._channel = grpc.secure_channel(spec.address, spec.credentials, options=spec.options)
                self._channel_stub = RoomAllocatorServiceStub(self._channel)
            return self._channel_stub

    @property
    def _stub(self) -> RoomAllocatorServiceStub:
        stub = self._channel_stub
        return stub if stub is not None else self._connect()

    def _forget_after_fork(self) -> None:
        """In a forked child (see ``_fork``): the leased bases are the
        parent's, who hands them out too; locks may be held by parent threads
        that the child does not have; the refill thread is gone; the channel
        is the parent's. Start over with none of them."""
        keep_inherited(self._channel)
        self._channel = None
        self._channel_stub = None
        self._channel_lock = threading.Lock()
        self._leases = self._new_lease_book()
        self._executor = None
        self._executor_lock = threading.Lock()
        if self._fallback is not None:
            self._fallback.after_fork()

    def _call(
        self,
        method: Callable[..., _Response],
        request: Any,
        prefill_worker: str = "",
        dp_size: int = 0,
        timeout: Optional[float] = None,
    ) -> _Response:
        if self._closed:
            raise ValueError("the RoomClient is closed")
        try:
            return method(request, timeout=self._timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error, worker=prefill_worker, dp_size=dp_size) from error

    def _allocation_timeout(self) -> float:
        """The deadline of a call an allocation waits for: the short
        allocation deadline when a fallback can stand in."""
        fallback = self._fallback
        return self._timeout if fallback is None else min(self._timeout, fallback.deadline)

    def _outage(self, failure: RoomAllocatorError) -> bool:
        return self._fallback is not None and is_outage(failure)

    def _fallback_room(
        self, prefill_worker: str, first_rank: int, dp_size: int, num: int, cause: RoomAllocatorError
    ) -> int:
        fallback = self._fallback
        if fallback is None:
            raise cause
        return fallback.room(prefill_worker, first_rank, dp_size, num, cause)

    def _allocate_one(self, prefill_worker: str, dp_rank: int, dp_size: int) -> int:
        """One AllocateRoom, or a fallback room when it meets an outage."""
        try:
            response = self._call(
                self._stub.AllocateRoom,
                pb.AllocateRoomRequest(prefill_worker=prefill_worker, dp_rank=dp_rank, dp_size=dp_size),
                prefill_worker,
                dp_size,
                timeout=self._allocation_timeout(),
            )
        except (DpSizeMismatch, WorkerDeregistered):
            raise
        except RoomAllocatorError as error:
            if self._outage(error):
                return self._fallback_room(prefill_worker, dp_rank, dp_size, 1, error)
            raise
        allocated = AllocatedRoom(response.room, response.dp_size)
        return check_allocated(allocated, dp_rank, dp_size).room

    def _refill_inline(self, worker: WorkerLease, dp_size: int, at_least: int) -> Optional[RoomAllocatorError]:
        """Leases (at least ``at_least`` bases) for a caller that found the
        lease empty; the caller holds the refill lock. Returns the failure
        the caller may stand in for (AllocateRoom, or the fallback); a
        mismatch or a deregistration is raised."""
        try:
            if self._fallback is not None and self._fallback.space is None:
                # The fallback needs the server's bounds before an outage.
                self._room_space(self._allocation_timeout())
            self._refill_locked(worker, dp_size, at_least, self._allocation_timeout())
        except (DpSizeMismatch, WorkerDeregistered):
            raise
        except RoomAllocatorError as error:
            log.debug("leasing for %r failed (%s)", worker.prefill_worker, error)
            return error
        return None

    def _refill_locked(
        self, worker: WorkerLease, dp_size: int, at_least: int = 1, timeout: Optional[float] = None
    ) -> None:
        """Leases one more block for ``worker`` at ``dp_size``; the caller
        holds the worker's refill lock. LeaseRooms always carries the dp_size
        the caller expects, so a realignment is refused, never adopted; a
        mismatch or a deregistration drops the lease."""
        count = self._leases.lease_count(worker, dp_size, at_least)
        sent_at = monotonic()
        try:
            lease = self._lease_rooms(
                worker.prefill_worker, count, dp_size, self._timeout if timeout is None else timeout
            )
        except (DpSizeMismatch, WorkerDeregistered):
            self._leases.drop(worker.prefill_worker)
            raise
        self._leases.add(worker, lease, dp_size, sent_at)

    def _start_refill(self, worker: WorkerLease) -> None:
        with self._executor_lock:
            if self._closed:
                executor = None
            else:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="room-allocator-refill")
                executor = self._executor
                executor.submit(self._background_refill, worker)
        if executor is None:
            self._leases.refill_done(worker)

    def _background_refill(self, worker: WorkerLease) -> None:
        try:
            # A caller leasing inline already refills; nothing to add.
            if not worker.refill_lock.acquire(blocking=False):
                return
            try:
                self._refill_locked(worker, self._leases.background_dp_size(worker))
            except (RoomAllocatorError, ValueError) as error:
                log.debug(
                    "refilling the lease of %r failed (%s); the next allocate leases or falls back to AllocateRoom",
                    worker.prefill_worker,
                    error,
                )
            except Exception:  # noqa: BLE001 - a thread has no caller to raise to
                log.warning("refilling the lease of %r failed", worker.prefill_worker, exc_info=True)
            finally:
                worker.refill_lock.release()
        finally:
            self._leases.refill_done(worker)

    def __repr__(self) -> str:
        return f"RoomClient({'closed' if self._closed else 'open'})"
