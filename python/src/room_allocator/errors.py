"""The client's exceptions, typed where a router acts on them.

Failed calls are typed by the ``error-reason`` response metadata the server
attaches to every error it raises (like ``google.rpc.ErrorInfo.reason``), never
by parsing the message, which is for humans and may change. Failures that
never reached the server (connection refused, deadline) carry no reason and
are typed by their status code.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import grpc

__all__ = [
    "ERROR_REASON",
    "REGISTERED_DP_SIZE",
    "RoomAllocatorError",
    "DpSizeMismatch",
    "WorkerDeregistered",
    "WorkerNotFound",
    "RoomNotFound",
    "Unavailable",
    "Unauthenticated",
]

#: Response metadata naming why a call failed: ``DP_SIZE_MISMATCH``, ...
ERROR_REASON = "error-reason"
#: Response metadata of a ``DP_SIZE_MISMATCH``: the dp_size the worker has.
REGISTERED_DP_SIZE = "registered-dp-size"

_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


class RoomAllocatorError(Exception):
    """A call failed: ``code`` is the gRPC status code, ``reason`` the
    server's ``error-reason`` (``None`` when the call never reached it) and
    ``details`` the status message."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: Optional[str] = None) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details
        self.reason = reason

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed if retried later (with backoff)."""
        return self.code in _RETRYABLE

    def __reduce__(self) -> Any:
        # Keyword-only constructors defeat Exception's pickling, which
        # replays ``args``; routers hand errors between processes.
        return (_restore, (type(self), self.args, self.__dict__.copy()))


def _restore(cls: type, args: tuple, state: dict) -> RoomAllocatorError:  # type: ignore[type-arg]
    error: RoomAllocatorError = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class DpSizeMismatch(RoomAllocatorError):
    """``worker`` is registered with dp_size ``registered``, not the
    ``requested`` one the caller believed: a room aligned to the wrong size
    would send the decode side to the wrong prefill rank, so none was given.
    Refresh the router's view of the worker, or realign it with ``register``."""

    def __init__(self, code: grpc.StatusCode, details: str, *, worker: str, registered: int, requested: int) -> None:
        super().__init__(code, details, "DP_SIZE_MISMATCH")
        self.worker = worker
        self.registered = registered
        self.requested = requested


class WorkerDeregistered(RoomAllocatorError):
    """``worker`` was deregistered: stop routing to it; only ``register``
    brings it back."""

    def __init__(self, code: grpc.StatusCode, details: str, *, worker: str) -> None:
        super().__init__(code, details, "WORKER_DEREGISTERED")
        self.worker = worker


class WorkerNotFound(RoomAllocatorError):
    """``worker`` was never registered (and the call could not register it)."""

    def __init__(self, code: grpc.StatusCode, details: str, *, worker: str) -> None:
        super().__init__(code, details, "WORKER_NOT_FOUND")
        self.worker = worker


class RoomNotFound(RoomAllocatorError):
    """The room was never issued (``reason`` ``ROOM_NOT_FOUND``), or was
    issued longer ago than the server's retention (``ROOM_PRUNED``)."""

    @property
    def pruned(self) -> bool:
        return self.reason == "ROOM_PRUNED"


class Unavailable(RoomAllocatorError):
    """The server could not be reached, or its store could not reserve
    (``STORE_UNAVAILABLE``): retry with backoff."""

    @property
    def retryable(self) -> bool:
        return True


class Unauthenticated(RoomAllocatorError):
    """The call needs the server's bearer token (``--auth-token-file``) and
    carried none or a wrong one: pass ``token=`` to the client."""


def _metadata_value(metadata: Optional[Iterable[Any]], key: str) -> Optional[str]:
    """One value of trailing metadata, as the sync (tuples of ``_Metadatum``)
    and asyncio (``grpc.aio.Metadata``) APIs give it."""
    if not metadata:
        return None
    for item in metadata:
        name, value = item[0], item[1]
        if name == key:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


def _call_method(error: grpc.RpcError, name: str) -> Any:
    method = getattr(error, name, None)
    return method() if callable(method) else None


def from_rpc_error(error: grpc.RpcError, *, worker: str = "", dp_size: int = 0) -> RoomAllocatorError:
    """Types a failed call by its ``error-reason`` metadata (then its code).

    ``worker`` and ``dp_size`` are what the call asked for, so that the
    exception can name them; the server's message names them too.
    """
    # grpc.RpcError itself declares nothing; the errors grpc raises are also
    # grpc.Call (sync) or grpc.aio.AioRpcError, which have these methods.
    code = _call_method(error, "code") or grpc.StatusCode.UNKNOWN
    details = _call_method(error, "details") or ""
    trailing = _call_method(error, "trailing_metadata")
    reason = _metadata_value(trailing, ERROR_REASON)
    if reason == "DP_SIZE_MISMATCH":
        registered = _metadata_value(trailing, REGISTERED_DP_SIZE)
        if registered is not None and registered.isdigit():
            return DpSizeMismatch(code, details, worker=worker, registered=int(registered), requested=dp_size)
    elif reason == "WORKER_DEREGISTERED":
        return WorkerDeregistered(code, details, worker=worker)
    elif reason == "WORKER_NOT_FOUND":
        return WorkerNotFound(code, details, worker=worker)
    elif reason in ("ROOM_NOT_FOUND", "ROOM_PRUNED"):
        return RoomNotFound(code, details, reason)
    if reason == "UNAUTHENTICATED" or code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(code, details, reason)
    if reason == "STORE_UNAVAILABLE" or code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(code, details, reason)
    return RoomAllocatorError(code, details, reason)
