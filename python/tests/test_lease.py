"""The I/O-free lease bookkeeping (the server-facing behaviour is in
test_client.py and test_aio.py)."""

from __future__ import annotations

import grpc
import pytest

from room_allocator import Lease, RoomAllocatorError
from room_allocator._lease import (
    INITIAL_LEASE,
    Block,
    LeaseState,
    block_of,
    max_lease_count,
)


def test_a_lease_hands_out_each_base_once_in_order_and_never_past_expiry() -> None:
    state = LeaseState()
    state.dp_size = 4
    state.push(Block(next=8, left=2, expires_at=10.0))
    state.push(Block(next=100, left=1, expires_at=20.0))
    assert state.take(now=0.0) == 8
    assert state.take(now=0.0) == 12
    assert state.available == 1 and state.low()
    assert state.take(now=20.0) is None  # the block expired
    assert state.available == 0


def test_an_expired_block_is_skipped_for_the_next_one() -> None:
    state = LeaseState()
    state.dp_size = 2
    state.push(Block(next=2, left=5, expires_at=1.0))
    state.push(Block(next=50, left=5, expires_at=3.0))
    assert state.take(now=2.0) == 50
    assert state.available == 4
    assert state.drop_expired(now=3.0) == 4 and state.available == 0


def test_lease_sizes_start_at_256_grow_while_leases_run_out_fast_and_shrink_when_idle() -> None:
    state = LeaseState()
    assert state.next_lease_size(now=100.0, dp_size=8) == INITIAL_LEASE == 256
    assert state.next_lease_size(now=100.5, dp_size=8) == 512
    assert state.next_lease_size(now=101.0, dp_size=8) == 1024
    assert state.next_lease_size(now=106.0, dp_size=8) == 1024  # between 1 s and 10 s: kept
    assert state.next_lease_size(now=200.0, dp_size=8) == 512
    assert state.next_lease_size(now=300.0, dp_size=8) == 256  # never below the first size


def test_lease_sizes_are_capped_by_the_servers_limits() -> None:
    assert max_lease_count(1) == 1_000_000
    assert max_lease_count(64) == 2**24 // 64
    assert max_lease_count(65536) == 256
    state = LeaseState()
    for i in range(40):
        size = state.next_lease_size(now=i * 0.1, dp_size=1)
    assert size == 1_000_000
    state = LeaseState()
    for i in range(40):
        size = state.next_lease_size(now=i * 0.1, dp_size=65536)
    assert size == 256


def test_a_block_lives_min_of_valid_for_and_max_lease_age_from_the_request() -> None:
    lease = Lease(first_base=40, count=10, dp_size=4, valid_for_ms=3000)
    assert block_of(lease, 4, sent_at=100.0, max_lease_age=10.0) == Block(40, 10, 103.0)
    assert block_of(lease, 4, sent_at=100.0, max_lease_age=0.5) == Block(40, 10, 100.5)
    # The last room of the space is fine.
    assert block_of(Lease(2**63 - 8, 2, 4, 1000), 4, sent_at=0.0, max_lease_age=1.0).left == 2


@pytest.mark.parametrize(
    "lease",
    [Lease(40, 10, 8, 1000), Lease(42, 10, 4, 1000), Lease(0, 10, 4, 1000), Lease(2**63 - 4, 2, 4, 1000)],
    ids=["size", "unaligned", "zero", "past-max-room"],
)
def test_bases_that_break_the_contract_are_refused(lease: Lease) -> None:
    with pytest.raises(RoomAllocatorError) as raised:
        block_of(lease, 4, sent_at=0.0, max_lease_age=10.0)
    assert raised.value.code == grpc.StatusCode.INTERNAL


def test_a_block_of_no_bases_is_not_kept() -> None:
    state = LeaseState()
    state.dp_size = 4
    state.push(block_of(Lease(40, 0, 4, 1000), 4, sent_at=0.0, max_lease_age=10.0))
    assert state.take(now=0.0) is None and state.available == 0
