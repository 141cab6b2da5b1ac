"""``AsyncRoomClient``: the asyncio client, on ``grpc.aio``."""

from __future__ import annotations

import asyncio
import functools
import logging
from time import monotonic
from types import TracebackType
from typing import Any, Awaitable, Callable, Iterable, List, Optional, Sequence, Set, Tuple, Type, TypeVar, Union

import grpc
import grpc.aio

from ._channel import DEFAULT_TIMEOUT, WORKERS_PAGE_SIZE, ChannelOptions, channel_spec
from . import _fork
from ._fork import grpc_aio_inherited, keep_inherited, mark_grpc_aio_inherited, track
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

__all__ = ["AsyncRoomClient"]

log = logging.getLogger("room_allocator")

_Response = TypeVar("_Response")


class AsyncRoomClient:
    """The asyncio twin of :class:`RoomClient`: the same arguments, the same
    methods as coroutines, the same lease semantics. Background refills run
    as tasks on the event loop the client is used from.

    Create it inside the event loop that uses it (grpc.aio channels belong
    to one loop), and use ``async with`` or ``await client.close()``.

    A forked child keeps none of the parent's leases, refill tasks or
    channel: its first call makes a channel of its own, on the blocking grpc
    stack in a thread when grpc.aio cannot work in the child (see README,
    "Forked processes").
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
        self._channel: Optional[Union[grpc.aio.Channel, grpc.Channel]] = None
        self._channel_stub: Any = None
        self._metadata = spec.metadata
        self._timeout = timeout
        self._refills: Set[asyncio.Task[None]] = set()
        self._closed = False
        self._connect()
        track(self)

    # -- lifecycle ---------------------------------------------------------

    async def close(self) -> None:
        """Cancels background refills and closes the channel (cancelling
        calls in flight). Idempotent; later calls raise ValueError."""
        if self._closed:
            return
        self._closed = True
        refills = list(self._refills)
        for task in refills:
            task.cancel()
        if refills:
            await asyncio.gather(*refills, return_exceptions=True)
        channel = self._channel
        if isinstance(channel, grpc.aio.Channel):
            await channel.close(grace=None)
        elif channel is not None:
            channel.close()

    async def __aenter__(self) -> AsyncRoomClient:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- rooms -------------------------------------------------------------

    async def allocate(self, prefill_worker: str, dp_rank: int, dp_size: int) -> int:
        """A room with ``room % dp_size == dp_rank``, from the lease when it
        can; see :meth:`RoomClient.allocate`."""
        if self._closed:
            raise ValueError("the AsyncRoomClient is closed")
        check_rank(dp_rank, dp_size)
        room = self._leases.take(prefill_worker, dp_rank, dp_size)
        if room is not None:
            return room
        worker = self._leases.worker(prefill_worker)
        async with worker.refill_lock:
            room = self._leases.take(prefill_worker, dp_rank, dp_size)
            if room is not None:
                return room
            self._leases.realign(worker, dp_size)
            failure = await self._refill_inline(worker, dp_size, 1)
        room = self._leases.take(prefill_worker, dp_rank, dp_size)
        if room is not None:
            return room
        if failure is not None and self._outage(failure):
            return self._fallback_room(prefill_worker, dp_rank, dp_size, 1, failure)
        return await self._allocate_one(prefill_worker, dp_rank, dp_size)

    async def allocate_many(self, prefill_worker: str, dp_ranks: Sequence[int], dp_size: int) -> List[int]:
        """A room for each rank of ``dp_ranks``, in order; see
        :meth:`RoomClient.allocate_many`."""
        if self._closed:
            raise ValueError("the AsyncRoomClient is closed")
        ranks = list(dp_ranks)
        for dp_rank in ranks:
            check_rank(dp_rank, dp_size)
        rooms = self._leases.take_many(prefill_worker, ranks, dp_size)
        if len(rooms) == len(ranks):
            return rooms
        worker = self._leases.worker(prefill_worker)
        failure: Optional[RoomAllocatorError] = None
        async with worker.refill_lock:
            rooms += self._leases.take_many(prefill_worker, ranks[len(rooms) :], dp_size)
            if len(rooms) < len(ranks):
                self._leases.realign(worker, dp_size)
                needed = min(len(ranks) - len(rooms), max_lease_count(dp_size))
                failure = await self._refill_inline(worker, dp_size, needed)
                rooms += self._leases.take_many(prefill_worker, ranks[len(rooms) :], dp_size)
        for dp_rank in ranks[len(rooms) :]:
            if failure is not None and self._outage(failure):
                rooms.append(self._fallback_room(prefill_worker, dp_rank, dp_size, 1, failure))
            else:
                rooms.append(await self.allocate(prefill_worker, dp_rank, dp_size))
        return rooms

    async def allocate_block(self, prefill_worker: str, first_rank: int, num: int, dp_size: int) -> int:
        """The first room of ``num`` consecutive numbers no one else gets;
        see :meth:`RoomClient.allocate_block`."""
        if self._closed:
            raise ValueError("the AsyncRoomClient is closed")
        bases = check_block(first_rank, num, dp_size)
        room = self._leases.take_block(prefill_worker, first_rank, num, dp_size)
        if room is not None:
            return room
        worker = self._leases.worker(prefill_worker)
        failure: Optional[RoomAllocatorError] = None
        for _ in range(BLOCK_ATTEMPTS):
            async with worker.refill_lock:
                room = self._leases.take_block(prefill_worker, first_rank, num, dp_size)
                if room is not None:
                    return room
                self._leases.realign(worker, dp_size)
                failure = await self._refill_inline(worker, dp_size, bases)
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
        """A room from the lease with no call and no await, or ``None``; see
        :meth:`RoomClient.try_allocate`. Call it from the client's loop."""
        if self._closed or not 0 <= dp_rank < dp_size:
            return None
        return self._leases.take(prefill_worker, dp_rank, dp_size)

    async def allocate_room(self, prefill_worker: str, dp_rank: int, dp_size: int = 0) -> AllocatedRoom:
        """One raw AllocateRoom call; see :meth:`RoomClient.allocate_room`."""
        response = await self._call(
            self._stub.AllocateRoom,
            pb.AllocateRoomRequest(prefill_worker=prefill_worker, dp_rank=dp_rank, dp_size=dp_size),
            prefill_worker,
            dp_size,
        )
        return check_allocated(AllocatedRoom(response.room, response.dp_size), dp_rank, dp_size)

    async def room_space(self) -> RoomSpace:
        """The rooms the server hands out (GetRoomSpace); see
        :meth:`RoomClient.room_space`."""
        return await self._room_space(self._timeout)

    async def _room_space(self, timeout: float) -> RoomSpace:
        response = await self._call(self._stub.GetRoomSpace, pb.GetRoomSpaceRequest(), timeout=timeout)
        space = RoomSpace(response.min_room, response.max_room)
        if self._fallback is not None:
            self._fallback.learn(space)
        return space

    async def warm_up(self, workers: Iterable[Tuple[str, int]] = ()) -> RoomSpace:
        """Connects now and leases for each ``(prefill_worker, dp_size)``;
        see :meth:`RoomClient.warm_up`."""
        space = await self.room_space()
        for prefill_worker, dp_size in workers:
            worker = self._leases.worker(prefill_worker)
            async with worker.refill_lock:
                self._leases.realign(worker, dp_size)
                if self._leases.available(prefill_worker) == 0:
                    await self._refill_locked(worker, dp_size)
        return space

    @property
    def fallback_rooms(self) -> int:
        """Fallback rooms handed out so far (0 without a fallback region)."""
        return 0 if self._fallback is None else self._fallback.rooms

    async def lease_rooms(self, prefill_worker: str, count: int, dp_size: int = 0) -> Lease:
        """One raw LeaseRooms call; see :meth:`RoomClient.lease_rooms`."""
        return await self._lease_rooms(prefill_worker, count, dp_size, self._timeout)

    async def _lease_rooms(self, prefill_worker: str, count: int, dp_size: int, timeout: float) -> Lease:
        response = await self._call(
            self._stub.LeaseRooms,
            pb.LeaseRoomsRequest(prefill_worker=prefill_worker, count=count, dp_size=dp_size),
            prefill_worker,
            dp_size,
            timeout=timeout,
        )
        return Lease(response.first_base, response.count, response.dp_size, response.valid_for_ms)

    async def resolve(self, room: int) -> Resolved:
        """Which worker, rank and dp_size ``room`` was issued for."""
        response = await self._call(self._stub.ResolveRank, pb.ResolveRankRequest(room=room))
        return Resolved(response.prefill_worker, response.dp_rank, response.dp_size)

    # -- workers -----------------------------------------------------------

    async def register(self, prefill_worker: str, dp_size: int) -> WorkerInfo:
        """Registers (or realigns) a prefill worker; see :meth:`RoomClient.register`."""
        response = await self._call(
            self._stub.RegisterWorker,
            pb.RegisterWorkerRequest(prefill_worker=prefill_worker, dp_size=dp_size),
            prefill_worker,
            dp_size,
        )
        self._leases.drop(prefill_worker, unless_dp_size=dp_size)
        if not response.HasField("worker"):
            raise RoomAllocatorError(grpc.StatusCode.INTERNAL, "the server sent no worker")
        return WorkerInfo._from_pb(response.worker)

    async def deregister(self, prefill_worker: str) -> None:
        """Stops new rooms for a worker; see :meth:`RoomClient.deregister`."""
        await self._call(
            self._stub.DeregisterWorker,
            pb.DeregisterWorkerRequest(prefill_worker=prefill_worker),
            prefill_worker,
        )
        self._leases.drop(prefill_worker)

    async def workers(self) -> List[WorkerInfo]:
        """Every registered worker, sorted by name (pages through ListWorkers)."""
        workers: List[WorkerInfo] = []
        page_token = ""
        while True:
            page = await self._call(
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
            new_refill_lock=asyncio.Lock,
            start_refill=self._start_refill,
        )

    def _connect(self) -> Any:
        """The stub of the client's channel, made now if there is none (at
        creation, and on the first call of a forked child, in the loop that
        call runs in)."""
        if self._closed:
            raise ValueError("the AsyncRoomClient is closed")
        if self._channel_stub is None:
            spec = self._spec
            if grpc_aio_inherited():
                if _fork.grpcio_version() < _fork.FIRST_GRPCIO_SAFE_AFTER_AIO_FORK:
                    raise RoomAllocatorError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"this process was forked while a grpc.aio channel was open, and with grpcio "
                        f"{grpc.__version__} gRPC calls here hang or crash the parent process; create the "
                        f"AsyncRoomClient in a process not forked from one using grpc.aio (multiprocessing's "
                        f"spawn or forkserver start method), or upgrade grpcio to 1.81 or later",
                    )
                if spec.credentials is None:
                    channel = grpc.insecure_channel(spec.address, options=spec.options)
                else:
                    channel = grpc.secure_channel(spec.address, spec.credentials, options=spec.options)
                self._channel, self._channel_stub = channel, _ThreadedStub(RoomAllocatorServiceStub(channel))
            else:
                if spec.credentials is None:
                    aio_channel = grpc.aio.insecure_channel(spec.address, options=spec.options)
                else:
                    aio_channel = grpc.aio.secure_channel(spec.address, spec.credentials, options=spec.options)
                self._channel, self._channel_stub = aio_channel, RoomAllocatorServiceStub(aio_channel)
        return self._channel_stub

    @property
    def _stub(self) -> Any:
        stub = self._channel_stub
        return stub if stub is not None else self._connect()

    def _forget_after_fork(self) -> None:
        """In a forked child (see ``_fork``): the leased bases are the
        parent's, who hands them out too; the refill tasks and the channel
        belong to the parent's event loop, which the child must not run.
        Start over with none of them."""
        if isinstance(self._channel, grpc.aio.Channel) and not self._closed:
            mark_grpc_aio_inherited()
        keep_inherited(self._channel)
        self._channel = None
        self._channel_stub = None
        self._leases = self._new_lease_book()
        self._refills = set()
        if self._fallback is not None:
            self._fallback.after_fork()

    async def _call(
        self,
        method: Callable[..., Awaitable[_Response]],
        request: Any,
        prefill_worker: str = "",
        dp_size: int = 0,
        timeout: Optional[float] = None,
    ) -> _Response:
        if self._closed:
            raise ValueError("the AsyncRoomClient is closed")
        try:
            return await method(
                request, timeout=self._timeout if timeout is None else timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, worker=prefill_worker, dp_size=dp_size) from error

    def _allocation_timeout(self) -> float:
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

    async def _allocate_one(self, prefill_worker: str, dp_rank: int, dp_size: int) -> int:
        """One AllocateRoom, or a fallback room when it meets an outage."""
        try:
            response = await self._call(
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

    async def _refill_inline(
        self, worker: WorkerLease, dp_size: int, at_least: int
    ) -> Optional[RoomAllocatorError]:
        """See :meth:`RoomClient._refill_inline`."""
        try:
            if self._fallback is not None and self._fallback.space is None:
                await self._room_space(self._allocation_timeout())
            await self._refill_locked(worker, dp_size, at_least, self._allocation_timeout())
        except (DpSizeMismatch, WorkerDeregistered):
            raise
        except RoomAllocatorError as error:
            log.debug("leasing for %r failed (%s)", worker.prefill_worker, error)
            return error
        return None

    async def _refill_locked(
        self, worker: WorkerLease, dp_size: int, at_least: int = 1, timeout: Optional[float] = None
    ) -> None:
        """Leases one more block; see :meth:`RoomClient._refill_locked`."""
        count = self._leases.lease_count(worker, dp_size, at_least)
        sent_at = monotonic()
        try:
            lease = await self._lease_rooms(
                worker.prefill_worker, count, dp_size, self._timeout if timeout is None else timeout
            )
        except (DpSizeMismatch, WorkerDeregistered):
            self._leases.drop(worker.prefill_worker)
            raise
        self._leases.add(worker, lease, dp_size, sent_at)

    def _start_refill(self, worker: WorkerLease) -> None:
        if self._closed:
            self._leases.refill_done(worker)
            return
        task = asyncio.get_running_loop().create_task(self._background_refill(worker))
        # The loop keeps only weak references to tasks.
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def _background_refill(self, worker: WorkerLease) -> None:
        try:
            if worker.refill_lock.locked():
                return  # a caller leasing inline already refills
            async with worker.refill_lock:
                await self._refill_locked(worker, self._leases.background_dp_size(worker))
        except (RoomAllocatorError, ValueError) as error:
            log.debug(
                "refilling the lease of %r failed (%s); the next allocate leases or falls back to AllocateRoom",
                worker.prefill_worker,
                error,
            )
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a task has no caller to raise to
            log.warning("refilling the lease of %r failed", worker.prefill_worker, exc_info=True)
        finally:
            self._leases.refill_done(worker)

    def __repr__(self) -> str:
        return f"AsyncRoomClient({'closed' if self._closed else 'open'})"


class _ThreadedStub:
    """The blocking stack's stub with coroutine methods: each call runs in
    the event loop's default executor. Used where grpc.aio calls would hang
    (a forked child, see ``_fork``); a call cancelled by the caller still
    runs in its thread until it ends or reaches its deadline."""

    def __init__(self, stub: RoomAllocatorServiceStub) -> None:
        self._stub = stub

    def __getattr__(self, method_name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._stub, method_name)

        async def call(request: Any, **kwargs: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(None, functools.partial(method, request, **kwargs))

        return call
