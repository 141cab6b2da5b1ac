"""What a forked child does with the clients it inherited from its parent.

``fork()`` copies a client's memory into the child: its leased bases, which
the parent goes on handing out, so without this module the child and the
parent hand out the same rooms. It also copies locks that the parent's other
threads may hold (held forever in the child, where those threads do not
exist), a refill thread pool whose thread is gone, and a gRPC channel whose
connection and gRPC threads are the parent's.

Every client registers here when it is created; right after a fork, in the
child, each live client forgets its leases, its refill machinery and its
channel (see ``_forget_after_fork`` of each client). The child leases afresh
from the server on a channel of its own, made on first use.

grpc.aio cannot be used at all in a child forked while a grpc.aio channel was
open: its process-wide completion queue is served by a poller thread that
the child does not have, so every call in the child, on any new channel too,
waits forever, deadline or not (seen with grpcio 1.85, with and without
``GRPC_ENABLE_FORK_SUPPORT``). In such a child the asyncio client makes its
calls on the blocking grpc stack, in the event loop's default executor. That
works from grpcio 1.81 on (tested: 1.81.0, 1.81.2, 1.82.3, 1.85.4); with
older grpcio, gRPC calls in such a child hung (1.80.1) or crashed the
*parent* with a segmentation fault (1.71.0, 1.78.2), so there the client
refuses to call at all (FAILED_PRECONDITION) rather than risk its parent.

Only forks that run Python's at-fork handlers are seen: ``os.fork()`` and
what is built on it (multiprocessing's fork start method, gunicorn and
uvicorn workers). A C extension that calls ``fork()`` without ``exec`` is not.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, List, Protocol, Tuple

import grpc


class ForkAware(Protocol):
    _closed: bool

    def _forget_after_fork(self) -> None: ...


_live_clients: "weakref.WeakSet[ForkAware]" = weakref.WeakSet()

#: The parent's channels, kept referenced in the child and never used or
#: closed there: closing one could shut down the connection the child shares
#: with its parent (one socket, two processes) and would call into gRPC state
#: that belongs to the parent's threads.
_inherited_channels: List[Any] = []

#: Set in a child forked while an :class:`AsyncRoomClient` had a grpc.aio
#: channel open (and inherited by that child's own children).
_grpc_aio_inherited = False

#: The first grpcio whose blocking stack worked, in our tests, in a child
#: forked while a grpc.aio channel was open (see above).
FIRST_GRPCIO_SAFE_AFTER_AIO_FORK = (1, 81)


def grpcio_version() -> Tuple[int, ...]:
    """``grpc.__version__`` as numbers (major, minor); (0,) if unreadable."""
    try:
        return tuple(int(part) for part in grpc.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return (0,)


def track(client: ForkAware) -> None:
    """Makes ``client`` forget its leases and channel in forked children."""
    _live_clients.add(client)


def keep_inherited(channel: Any) -> None:
    """Keeps the parent's ``channel`` alive, unused, in the child."""
    if channel is not None:
        _inherited_channels.append(channel)


def grpc_aio_inherited() -> bool:
    """True when grpc.aio calls would hang in this process (see above)."""
    return _grpc_aio_inherited


def mark_grpc_aio_inherited() -> None:
    global _grpc_aio_inherited
    _grpc_aio_inherited = True


def _after_fork_in_child() -> None:
    # Runs in the child before fork() returns there: the child has one
    # thread, so nothing else touches the clients meanwhile.
    for client in list(_live_clients):
        try:
            client._forget_after_fork()
        except BaseException:  # noqa: BLE001 - an at-fork handler has no caller
            # A client that kept the parent's leases must not hand them out:
            # closed, it refuses every call and try_allocate gives None.
            client._closed = True


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
