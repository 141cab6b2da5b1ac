"""Typing of failed calls by error-reason (the server-facing cases are in
test_client.py, test_aio.py and test_security.py)."""

from __future__ import annotations

import pickle
from typing import Optional, Sequence, Tuple

import grpc
import pytest

from room_allocator import (
    DpSizeMismatch,
    RoomAllocatorError,
    RoomNotFound,
    Unauthenticated,
    Unavailable,
    WorkerDeregistered,
)
from room_allocator.errors import from_rpc_error


class FailedCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What grpc raises: an RpcError that is also a Call."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Sequence[Tuple[str, str]]) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Tuple[Tuple[str, str], ...]:
        return self._trailing

    def initial_metadata(self) -> None: ...
    def is_active(self) -> bool: return False
    def time_remaining(self) -> Optional[float]: return None
    def cancel(self) -> bool: return False
    def add_callback(self, callback) -> bool: return False  # type: ignore[no-untyped-def]


@pytest.mark.parametrize(
    "code, trailing, expected, retryable",
    [
        (grpc.StatusCode.UNAVAILABLE, [("error-reason", "STORE_UNAVAILABLE")], Unavailable, True),
        (grpc.StatusCode.UNAVAILABLE, [], Unavailable, True),
        (grpc.StatusCode.UNAUTHENTICATED, [("error-reason", "UNAUTHENTICATED")], Unauthenticated, False),
        (grpc.StatusCode.NOT_FOUND, [("error-reason", "ROOM_PRUNED")], RoomNotFound, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, [("error-reason", "SPACE_EXHAUSTED")], RoomAllocatorError, True),
        # A mismatch without the registered size cannot say it: untyped.
        (grpc.StatusCode.FAILED_PRECONDITION, [("error-reason", "DP_SIZE_MISMATCH")], RoomAllocatorError, False),
    ],
)
def test_errors_are_typed_by_reason_then_code(code, trailing, expected, retryable) -> None:  # type: ignore[no-untyped-def]
    error = from_rpc_error(FailedCall(code, "message", trailing), worker="w", dp_size=2)
    assert type(error) is expected
    assert error.retryable is retryable and error.details == "message" and error.code == code
    if trailing:
        assert error.reason == trailing[0][1]


def test_errors_survive_pickling_between_processes() -> None:
    mismatch = from_rpc_error(
        FailedCall(
            grpc.StatusCode.FAILED_PRECONDITION,
            "registered with 4",
            [("error-reason", "DP_SIZE_MISMATCH"), ("registered-dp-size", "4")],
        ),
        worker="prefill-0",
        dp_size=8,
    )
    assert isinstance(mismatch, DpSizeMismatch)
    copy = pickle.loads(pickle.dumps(mismatch))
    assert type(copy) is DpSizeMismatch
    assert (copy.worker, copy.registered, copy.requested, copy.reason) == ("prefill-0", 4, 8, "DP_SIZE_MISMATCH")
    assert str(copy) == str(mismatch) == "FAILED_PRECONDITION: registered with 4"
    gone = pickle.loads(pickle.dumps(WorkerDeregistered(grpc.StatusCode.FAILED_PRECONDITION, "gone", worker="w")))
    assert gone.worker == "w" and gone.code == grpc.StatusCode.FAILED_PRECONDITION
