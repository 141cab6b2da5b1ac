"""The opt-in outage fallback: when no leased room is left and the allocator
cannot be reached within the allocation deadline, a rank-aligned random room
from a region the allocator never hands out.

Why a region of its own: allocator rooms are dense (consecutive numbers for
consecutive requests), so a random room anywhere in the allocator's space
would likely equal one it issued or will issue. A region disjoint from the
server's ``--min-room..=--max-room`` (learned through GetRoomSpace, and
refused when it overlaps) can only collide with other fallback rooms. With
the server's default bounds (``1..=2^63-1``) no such region exists: the
operator leaves one, e.g. ``--max-room 4611686018427387903`` and the
fallback region ``2^62..=2^63-1``. Mirrors ``client/src/fallback.rs``.

Odds of a collision inside the region: a fallback room for rank ``r`` is
drawn uniformly among the ``N = region_size / dp_size`` aligned numbers of
the region. Rooms of different ranks never meet, so for ``k`` fallback rooms
of one rank still in flight together (all clients, all outages), the chance
two are equal is at most ``k^2 / (2 N)`` (the birthday bound); blocks of
``num`` rooms overlap when their starts are within ``num - 1``, so for blocks
at most ``k^2 (2 num - 1) / (2 N)``. With the region ``2^62..=2^63-1``,
``dp_size = 8`` and a million fallback rooms of one rank: ``10^12 / 2^60``,
under 1e-6. The draw is ``random.SystemRandom`` (the operating system's
randomness), so forked processes never draw the same sequence.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import grpc

from ._lease import MAX_ROOM
from ._types import RoomSpace
from .errors import RoomAllocatorError

__all__ = ["DEFAULT_ALLOCATION_DEADLINE", "FallbackRoom"]

#: Seconds an allocation that has no leased room waits for the allocator
#: before it uses a fallback room (only with a fallback region): long enough
#: for a LeaseRooms on a healthy network (about a millisecond, plus an fsync
#: of the embedded store), short next to a request's own latency.
DEFAULT_ALLOCATION_DEADLINE = 0.05

#: Failures the fallback stands in for: the allocator was not reached or did
#: not answer in time. A refusal (a dp_size mismatch, a deregistered worker,
#: a missing token) is an answer, and is raised.
_OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class FallbackRoom:
    """What the fallback callback is told about each fallback room (a room,
    the start of a block of ``num`` rooms, or one item of a batch)."""

    prefill_worker: str
    dp_rank: int
    dp_size: int
    room: int
    #: Consecutive numbers the room starts: 1, or the ``num`` of a block.
    num: int
    #: Why the allocator was not used.
    cause: RoomAllocatorError


FallbackCallback = Callable[[FallbackRoom], None]


def is_outage(error: RoomAllocatorError) -> bool:
    return error.code in _OUTAGE_CODES


class Fallback:
    """A checked region, the server's bounds once learned, and the count."""

    def __init__(self, region: Tuple[int, int], deadline: float, on_fallback: Optional[FallbackCallback]) -> None:
        start, end = region
        if not 1 <= start <= end <= MAX_ROOM:
            raise ValueError(
                f"the outage fallback region {start}..={end} is not a non-empty part of the room space 1..={MAX_ROOM}"
            )
        if not deadline > 0:
            raise ValueError(f"allocation_deadline must be positive seconds, not {deadline!r}")
        self.start = start
        self.end = end
        self.deadline = deadline
        self.on_fallback = on_fallback
        #: The server's bounds, checked disjoint from the region; ``None``
        #: until learned: no fallback room leaves before that.
        self.space: Optional[RoomSpace] = None
        self._count = 0
        self._count_lock = threading.Lock()
        self._random = random.SystemRandom()

    @property
    def rooms(self) -> int:
        return self._count

    def after_fork(self) -> None:
        """In a forked child: the count's lock may be held by a parent thread
        the child does not have. The region and the learned bounds stay
        valid; ``SystemRandom`` reads the operating system's randomness, so
        the child never repeats the parent's draws."""
        self._count_lock = threading.Lock()

    def learn(self, space: RoomSpace) -> None:
        """Keeps the server's bounds; raises ValueError when the region
        shares a number with them."""
        if not (self.end < space.min_room or self.start > space.max_room):
            # Bounds that moved over the region disarm the fallback.
            self.space = None
            raise ValueError(
                f"the outage fallback region {self.start}..={self.end} overlaps the rooms the allocator hands out, "
                f"{space.min_room}..={space.max_room} (its --min-room/--max-room), so a fallback room could equal an "
                f"allocator room; leave the region to the fallback, e.g. serve with --max-room 4611686018427387903 "
                f"and fall back from 4611686018427387904 (2^62) to {MAX_ROOM}"
            )
        self.space = space

    def pick(self, first_rank: int, dp_size: int, num: int) -> int:
        """A uniformly drawn room ``room % dp_size == first_rank`` whose
        block ``room..room + num`` fits in the region."""
        first = self.start + (first_rank - self.start) % dp_size
        last_start = self.end - (num - 1)
        if first > last_start:
            raise ValueError(
                f"the outage fallback region {self.start}..={self.end} holds no block of {num} rooms "
                f"from rank {first_rank} of dp_size {dp_size}; give it a larger region"
            )
        return first + self._random.randrange((last_start - first) // dp_size + 1) * dp_size

    def room(
        self, prefill_worker: str, first_rank: int, dp_size: int, num: int, cause: RoomAllocatorError
    ) -> int:
        """A fallback room, counted and reported; ``cause`` is raised when
        the server's bounds were never learned (nothing shows the region is
        disjoint from them)."""
        if self.space is None:
            raise cause
        room = self.pick(first_rank, dp_size, num)
        with self._count_lock:
            self._count += 1
        if self.on_fallback is not None:
            self.on_fallback(FallbackRoom(prefill_worker, first_rank, dp_size, room, num, cause))
        return room
