"""Python client of room-allocator: bootstrap rooms for SGLang/Dynamo P/D
serving, aligned to the prefill data-parallel rank (``room % dp_size ==
dp_rank``) and never handed out twice.

>>> from room_allocator import RoomClient
>>> with RoomClient("127.0.0.1:50051") as client:          # doctest: +SKIP
...     client.register("prefill-0", dp_size=4)
...     room = client.allocate("prefill-0", dp_rank=3, dp_size=4)  # room % 4 == 3

See README.md for the lease semantics, errors and options.
"""

from ._aio import AsyncRoomClient
from ._client import RoomClient
from ._fallback import DEFAULT_ALLOCATION_DEADLINE, FallbackRoom
from ._lease import DEFAULT_MAX_LEASE_AGE, MAX_LEASE_COUNT, MAX_LEASE_NUMBERS, MAX_ROOM
from ._types import AllocatedRoom, Lease, Resolved, RoomSpace, WorkerInfo
from .errors import (
    DpSizeMismatch,
    RoomAllocatorError,
    RoomNotFound,
    Unauthenticated,
    Unavailable,
    WorkerDeregistered,
    WorkerNotFound,
)

__version__ = "0.1.0"

__all__ = [
    "AllocatedRoom",
    "AsyncRoomClient",
    "DEFAULT_ALLOCATION_DEADLINE",
    "DEFAULT_MAX_LEASE_AGE",
    "DpSizeMismatch",
    "FallbackRoom",
    "Lease",
    "MAX_LEASE_COUNT",
    "MAX_LEASE_NUMBERS",
    "MAX_ROOM",
    "Resolved",
    "RoomAllocatorError",
    "RoomClient",
    "RoomNotFound",
    "RoomSpace",
    "Unauthenticated",
    "Unavailable",
    "WorkerDeregistered",
    "WorkerInfo",
    "WorkerNotFound",
]
