"""A worker's leased bases: blocks of ``first_base + i * dp_size``, each base
handed out once, each block only until it expires.

This is the I/O-free half of the lease logic, shared by :class:`RoomClient`
and :class:`AsyncRoomClient`; it mirrors ``client/src/lease.rs`` of the Rust
client so that both behave alike against the same server. The clients add
the locking and the LeaseRooms calls.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from time import monotonic
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import grpc

from ._types import AllocatedRoom, Lease
from .errors import RoomAllocatorError

#: First lease size; doubles while leases run out within ``FAST_LEASE``.
INITIAL_LEASE = 256
#: Seconds: a lease used up faster than this means the next should be larger,
#: one lasting ten times this that it should be smaller.
FAST_LEASE = 1.0
#: Seconds a leased base is kept at most (the server's ``valid_for_ms`` bounds
#: it too): a realignment made by another router reaches this one within it
#: even when nothing triggers a refill. Matches the server's default
#: ``--etcd-staleness-secs``.
DEFAULT_MAX_LEASE_AGE = 10.0
#: Largest room: SGLang masks bootstrap rooms to 63 bits; 0 means "not ready".
MAX_ROOM = (1 << 63) - 1
#: Most bases one LeaseRooms call may take...
MAX_LEASE_COUNT = 1_000_000
#: ...and most numbers of the room space (``count * dp_size``) it may cover.
MAX_LEASE_NUMBERS = 1 << 24
#: Leases an ``allocate_block`` makes at most before it gives up: each holds
#: the block's bases, so only concurrent takers between its arrival and the
#: take can leave it short.
BLOCK_ATTEMPTS = 3


@dataclass
class Block:
    """One leased block: the bases ``next, next + dp_size, ...``, ``left`` of
    them, usable until ``expires_at`` (``time.monotonic()`` seconds). Past
    that its bases are dropped unused: their rooms might not resolve for the
    server's whole retention period, or might miss a realignment."""

    __slots__ = ("next", "left", "expires_at")
    next: int
    left: int
    expires_at: float


def max_lease_count(dp_size: int) -> int:
    """Largest lease the server grants at ``dp_size``."""
    return max(1, min(MAX_LEASE_COUNT, MAX_LEASE_NUMBERS // max(dp_size, 1)))


class LeaseState:
    """The leased bases of one worker, and how large its next lease is.

    Not thread-safe: the sync client guards it with a lock, the asyncio client
    only touches it from its event loop.
    """

    __slots__ = ("dp_size", "blocks", "available", "lease_size", "last_lease_at")

    def __init__(self, initial_lease: int = INITIAL_LEASE) -> None:
        #: dp_size the leased bases are aligned to; 0 = none leased yet.
        self.dp_size = 0
        self.blocks: Deque[Block] = deque()
        #: Bases left in all blocks (expired ones included until dropped).
        self.available = 0
        #: Bases asked for at the next refill.
        self.lease_size = initial_lease
        #: When the last lease was asked for; ``None`` before the first.
        self.last_lease_at: Optional[float] = None

    def take(self, now: float) -> Optional[int]:
        """The next unexpired base, or ``None``. Every block is checked for
        expiry before a base is taken from it, so no expired base leaves."""
        blocks = self.blocks
        while blocks:
            block = blocks[0]
            if block.expires_at <= now:
                blocks.popleft()
                self.available -= block.left
                continue
            base = block.next
            block.next += self.dp_size
            block.left -= 1
            if block.left == 0:
                blocks.popleft()
            self.available -= 1
            return base
        return None

    def take_run(self, bases: int, now: float) -> Optional[int]:
        """The first of ``bases`` consecutive bases of one unexpired block
        (they cover ``bases * dp_size`` consecutive numbers no one else
        gets), or ``None`` when no block has that many left. Blocks too short
        for the run stay for single takes."""
        for index, block in enumerate(self.blocks):
            if block.expires_at <= now or block.left < bases:
                continue
            base = block.next
            block.next += bases * self.dp_size
            block.left -= bases
            if block.left == 0:
                del self.blocks[index]
            self.available -= bases
            return base
        return None

    def push(self, block: Block) -> None:
        if block.left <= 0:
            return
        self.available += block.left
        self.blocks.append(block)

    def low(self) -> bool:
        """True when a refill should start: half a lease or less is left."""
        return self.available <= self.lease_size // 2

    def drop_expired(self, now: float) -> int:
        """Drops every block past its expiry; returns how many bases went unused."""
        kept = [block for block in self.blocks if block.expires_at > now]
        dropped = self.available - sum(block.left for block in kept)
        self.blocks = deque(kept)
        self.available -= dropped
        return dropped

    def drop_leases(self) -> None:
        """Forgets every leased base. Their numbers are skipped, never
        reissued: the room space has 2^63 of them."""
        self.blocks.clear()
        self.available = 0

    def next_lease_size(self, now: float, dp_size: int) -> int:
        """Sizes the next lease: doubles while leases run out within
        ``FAST_LEASE``, halves when they last over ten times that; capped at
        what one LeaseRooms call may take at ``dp_size``. The first lease is
        ``INITIAL_LEASE``: there is no earlier one to have run out.

        (The Rust client counts the first lease from the moment it first saw
        the worker, so its first lease is usually twice ``INITIAL_LEASE``.)
        """
        largest = max_lease_count(dp_size)
        if self.last_lease_at is not None:
            since = now - self.last_lease_at
            if since < FAST_LEASE:
                self.lease_size *= 2
            elif since > FAST_LEASE * 10:
                self.lease_size //= 2
        self.lease_size = max(min(INITIAL_LEASE, largest), min(self.lease_size, largest))
        self.last_lease_at = now
        return self.lease_size


class WorkerLease:
    """One worker's lease, and what keeps its refills one at a time."""

    __slots__ = ("prefill_worker", "state", "lock", "refill_lock", "refilling")

    def __init__(self, prefill_worker: str, refill_lock: Any) -> None:
        self.prefill_worker = prefill_worker
        self.state = LeaseState()
        #: Guards ``state`` and ``refilling``; held for microseconds, never
        #: across a call.
        self.lock = threading.Lock()
        #: Held across a LeaseRooms call (a ``threading.Lock`` in the sync
        #: client, an ``asyncio.Lock`` in the asyncio one): one lease in
        #: flight per worker, so concurrent callers wait for it rather than
        #: leasing a block each.
        self.refill_lock = refill_lock
        #: A background refill has been started and has not finished.
        self.refilling = False


class LeaseBook:
    """The leases of every worker a client allocates for.

    ``start_refill(worker)`` is called (outside any lock) when a worker's
    lease runs low; the client runs the refill in the background and calls
    :meth:`refill_done` when it ends.
    """

    def __init__(
        self,
        *,
        max_lease_age: float,
        new_refill_lock: Callable[[], Any],
        start_refill: Callable[[WorkerLease], None],
    ) -> None:
        if not max_lease_age > 0:
            raise ValueError(f"max_lease_age must be positive seconds, not {max_lease_age!r}")
        self.max_lease_age = max_lease_age
        self._new_refill_lock = new_refill_lock
        self._start_refill = start_refill
        self._workers: Dict[str, WorkerLease] = {}
        self._workers_lock = threading.Lock()

    def take(self, prefill_worker: str, dp_rank: int, dp_size: int) -> Optional[int]:
        """A room from the lease with no call, or ``None`` when the lease is
        empty, expired, or of another dp_size. The hot path: one dict lookup,
        one uncontended lock, one clock read."""
        worker = self._workers.get(prefill_worker)
        if worker is None:
            return None
        with worker.lock:
            state = worker.state
            if state.dp_size != dp_size:
                return None
            base = state.take(monotonic())
            if base is None:
                return None
            refill = not worker.refilling and state.low()
            if refill:
                worker.refilling = True
        if refill:
            self._start_refill(worker)
        return base + dp_rank

    def take_many(self, prefill_worker: str, dp_ranks: Sequence[int], dp_size: int) -> List[int]:
        """Rooms for the first ranks of ``dp_ranks`` from the lease, in
        order, under one lock; fewer (maybe none) when the lease runs out.
        The caller gets the rest after a refill."""
        worker = self._workers.get(prefill_worker)
        if worker is None:
            return []
        rooms: List[int] = []
        with worker.lock:
            state = worker.state
            if state.dp_size != dp_size:
                return rooms
            now = monotonic()
            for dp_rank in dp_ranks:
                base = state.take(now)
                if base is None:
                    break
                rooms.append(base + dp_rank)
            refill = bool(rooms) and not worker.refilling and state.low()
            if refill:
                worker.refilling = True
        if refill:
            self._start_refill(worker)
        return rooms

    def take_block(self, prefill_worker: str, first_rank: int, num: int, dp_size: int) -> Optional[int]:
        """The first room of ``num`` consecutive numbers from the lease
        (``room % dp_size == first_rank``), or ``None``. It takes
        :func:`block_bases` consecutive bases of one block: the numbers of
        the block before ``room`` and after ``room + num - 1`` are skipped."""
        worker = self._workers.get(prefill_worker)
        if worker is None:
            return None
        with worker.lock:
            state = worker.state
            if state.dp_size != dp_size:
                return None
            base = state.take_run(block_bases(first_rank, num, dp_size), monotonic())
            if base is None:
                return None
            refill = not worker.refilling and state.low()
            if refill:
                worker.refilling = True
        if refill:
            self._start_refill(worker)
        return base + first_rank

    def worker(self, prefill_worker: str) -> WorkerLease:
        worker = self._workers.get(prefill_worker)
        if worker is None:
            with self._workers_lock:
                worker = self._workers.get(prefill_worker)
                if worker is None:
                    worker = WorkerLease(prefill_worker, self._new_refill_lock())
                    self._workers[prefill_worker] = worker
        return worker

    def realign(self, worker: WorkerLease, dp_size: int) -> None:
        """Makes ``dp_size`` the size the worker's lease is for. The caller's
        view of the worker changed: the old lease is of no use for the new
        alignment, so it is dropped."""
        with worker.lock:
            if worker.state.dp_size != dp_size:
                worker.state.drop_leases()
                worker.state.dp_size = dp_size

    def lease_count(self, worker: WorkerLease, dp_size: int, at_least: int = 1) -> int:
        """How many bases to ask for now (see :meth:`LeaseState.next_lease_size`),
        and never fewer than ``at_least`` (a batch or a block that needs them
        in one lease)."""
        with worker.lock:
            return max(at_least, worker.state.next_lease_size(monotonic(), dp_size))

    def add(self, worker: WorkerLease, lease: Lease, dp_size: int, sent_at: float) -> None:
        """Keeps the bases of a LeaseRooms response asked for at ``dp_size``,
        unless the caller switched to another dp_size meanwhile (then they
        are skipped)."""
        block = block_of(lease, dp_size, sent_at, self.max_lease_age)
        with worker.lock:
            if worker.state.dp_size == dp_size:
                worker.state.push(block)

    def background_dp_size(self, worker: WorkerLease) -> int:
        """The dp_size a background refill leases for: the lease's own."""
        with worker.lock:
            return worker.state.dp_size

    def refill_done(self, worker: WorkerLease) -> None:
        with worker.lock:
            worker.refilling = False

    def drop(self, prefill_worker: str, *, unless_dp_size: Optional[int] = None) -> None:
        """Drops the worker's leased bases (all, or only if they are of
        another dp_size than ``unless_dp_size``)."""
        worker = self._workers.get(prefill_worker)
        if worker is None:
            return
        with worker.lock:
            if unless_dp_size is None or worker.state.dp_size != unless_dp_size:
                worker.state.drop_leases()

    def available(self, prefill_worker: str) -> int:
        """Bases left in the worker's lease (expired ones not yet dropped
        included); for tests and metrics."""
        worker = self._workers.get(prefill_worker)
        if worker is None:
            return 0
        with worker.lock:
            return worker.state.available


def block_of(lease: Lease, dp_size: int, sent_at: float, max_lease_age: float) -> Block:
    """The block of a LeaseRooms response asked for at ``dp_size``.

    It expires ``min(valid_for_ms, max_lease_age)`` after ``sent_at``, the
    moment the request left: the server's clock started before the response
    arrived, so counting from the arrival would overstay the lease.
    """
    last_room = lease.first_base + max(lease.count, 1) * dp_size - 1
    if (
        lease.dp_size != dp_size
        or lease.first_base % dp_size != 0
        or lease.first_base == 0
        or last_room > MAX_ROOM
    ):
        # The server broke its contract; never hand such bases on.
        raise RoomAllocatorError(
            grpc.StatusCode.INTERNAL,
            f"the server leased bases from {lease.first_base} of dp_size {lease.dp_size} for dp_size {dp_size}",
        )
    # A block of no bases is kept as none: allocate then falls back to
    # AllocateRoom.
    valid_for = lease.valid_for_ms / 1000.0
    valid_for = min(valid_for, max_lease_age) if valid_for > 0 else max_lease_age
    return Block(lease.first_base, lease.count, sent_at + valid_for)


def block_bases(first_rank: int, num: int, dp_size: int) -> int:
    """How many consecutive bases hold the numbers ``base + first_rank ..
    base + first_rank + num - 1``."""
    return -(-(first_rank + num) // dp_size)


def check_block(first_rank: int, num: int, dp_size: int) -> int:
    """Raises ValueError, without a call, unless a block of ``num`` rooms
    from ``first_rank`` fits in one LeaseRooms at ``dp_size``; returns the
    bases it takes."""
    check_rank(first_rank, dp_size)
    if num < 1:
        raise ValueError(f"a block needs at least one room, not {num}")
    bases = block_bases(first_rank, num, dp_size)
    if bases > max_lease_count(dp_size):
        raise ValueError(
            f"a block of {num} rooms at dp_size {dp_size} needs {bases} bases, more than one lease holds "
            f"({max_lease_count(dp_size)}); split the request"
        )
    return bases


def check_allocated(allocated: AllocatedRoom, dp_rank: int, dp_size: int) -> AllocatedRoom:
    """``allocated`` if it is aligned to ``dp_rank`` (and ``dp_size``, unless
    0 = as registered); raises otherwise, so a misaligned room never leaves."""
    aligned = allocated.dp_size != 0 and allocated.room % allocated.dp_size == dp_rank
    if not aligned or (dp_size != 0 and allocated.dp_size != dp_size):
        raise RoomAllocatorError(
            grpc.StatusCode.INTERNAL,
            f"the server returned room {allocated.room} of dp_size {allocated.dp_size} "
            f"for rank {dp_rank} of dp_size {dp_size}",
        )
    return allocated


def check_rank(dp_rank: int, dp_size: int) -> None:
    """Raises ValueError unless ``0 <= dp_rank < dp_size``; nothing is sent."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is out of range for dp_size {dp_size}; choose a rank in 0..{dp_size - 1}")
