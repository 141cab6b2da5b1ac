"""What the client's calls return: plain frozen dataclasses, so callers never
hold a protobuf message (whose API differs between protobuf releases)."""

from __future__ import annotations

from dataclasses import dataclass

from ._pb import room_allocator_pb2 as pb

__all__ = ["WorkerInfo", "Resolved", "Lease", "AllocatedRoom", "RoomSpace"]


@dataclass(frozen=True)
class WorkerInfo:
    """A prefill worker as the server has it."""

    prefill_worker: str
    #: Data-parallel size its rooms are currently aligned to.
    dp_size: int
    #: Rooms from AllocateRoom plus bases from LeaseRooms issued for it.
    rooms_issued: int

    @classmethod
    def _from_pb(cls, info: pb.WorkerInfo) -> WorkerInfo:
        return cls(info.prefill_worker, info.dp_size, info.rooms_issued)


@dataclass(frozen=True)
class Resolved:
    """Who a room was issued for (ResolveRank)."""

    prefill_worker: str
    #: ``room % dp_size``: the prefill rank SGLang's decode side pulls from.
    dp_rank: int
    #: The dp_size in force when the room was issued.
    dp_size: int


@dataclass(frozen=True)
class Lease:
    """A raw block of bases from one LeaseRooms call: ``first_base + i *
    dp_size`` for ``i < count``; the room for rank ``r`` is ``base + r``. Use
    each base once, within ``valid_for_ms`` of receiving it."""

    first_base: int
    count: int
    dp_size: int
    valid_for_ms: int

    def bases(self) -> range:
        """The leased bases, in order."""
        return range(self.first_base, self.first_base + self.count * self.dp_size, self.dp_size)


@dataclass(frozen=True)
class AllocatedRoom:
    """One room from a raw AllocateRoom call, and the dp_size it is aligned to."""

    room: int
    dp_size: int


@dataclass(frozen=True)
class RoomSpace:
    """The rooms a server hands out, ``min_room..=max_room`` (GetRoomSpace:
    its ``--min-room``/``--max-room``)."""

    min_room: int
    max_room: int
