#!/usr/bin/env python3
"""A prefill/decode (P/D) router in miniature, on room-allocator.

It plays both halves of each request, as SGLang's mini load balancer does:

1. the router picks a prefill worker and one of its data-parallel ranks,
   asks room-allocator for a room aligned to that rank, and puts the same
   ``bootstrap_room`` on the prefill and the decode request;
2. the decode side, knowing only the room and the prefill's dp_size, pulls
   the KV cache from rank ``bootstrap_room % prefill_dp_size``, which is the
   rank the router chose.

A batch of ``n = 1`` items gets one room per item (``allocate_many``), and
a request with ``n = 3`` samples one room starting a block of 3 numbers
(``allocate_block``): SGLang expands a single room sent with ``num`` items
to ``room + i`` (``GenerateReqInput._normalize_bootstrap_params``), and with
dense allocator rooms ``room + 1`` would otherwise be another request's.

Then a prefill worker is realigned to another dp_size while the router still
believes the old one: the router gets ``DpSizeMismatch`` carrying the
registered size, refreshes its view and carries on, and never gets a room
aligned to the wrong size.

Usage::

    room-allocator serve --listen 127.0.0.1:50051 &
    python python/examples/pd_router.py 127.0.0.1:50051 [--token-file FILE] [--requests N]

``--token-file`` holds the server's ``--auth-token-file`` token: registering
workers is an admin act when the server has one.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from room_allocator import DpSizeMismatch, RoomClient, Unauthenticated


def decode_side(bootstrap_room: int, prefill_dp_size: int) -> int:
    """What SGLang's decode side does: the prefill rank to pull from."""
    return bootstrap_room % prefill_dp_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("server", help="room-allocator gRPC address, host:port")
    parser.add_argument("--token-file", type=Path, help="file holding the server's bearer token")
    parser.add_argument("--requests", type=int, default=8, help="P/D requests to route (default 8)")
    args = parser.parse_args()
    token = args.token_file.read_text().strip() if args.token_file else None

    # The router's view of its prefill workers: name (their bootstrap
    # address, as routers know them) -> dp_size.
    prefill = {"10.0.0.1:8998": 4, "10.0.0.2:8998": 2}
    rng = random.Random(0)

    with RoomClient(args.server, token=token) as client:
        try:
            for name, dp_size in prefill.items():
                client.register(name, dp_size)
        except Unauthenticated as error:
            print(f"registering needs the server's token: pass --token-file ({error.details})", file=sys.stderr)
            return 2
        print(f"registered prefill workers {prefill}")

        for i in range(args.requests):
            name = rng.choice(sorted(prefill))
            dp_size = prefill[name]
            dp_rank = rng.randrange(dp_size)  # e.g. the least loaded rank
            room = client.allocate(name, dp_rank, dp_size)
            host, port = name.rsplit(":", 1)
            payload = {"bootstrap_host": host, "bootstrap_port": int(port), "bootstrap_room": room}
            recovered = decode_side(room, dp_size)
            resolved = client.resolve(room)
            ok = recovered == dp_rank and (resolved.prefill_worker, resolved.dp_rank) == (name, dp_rank)
            print(
                f"request {i}: prefill {name} rank {dp_rank}/{dp_size}, payload {json.dumps(payload)}; "
                f"decode pulls from rank {room} % {dp_size} = {recovered} {'ok' if ok else 'WRONG'}"
            )
            if not ok:
                return 1

        # A batch of three prompts, n = 1: a list, one room per item.
        name, dp_size = "10.0.0.1:8998", prefill["10.0.0.1:8998"]
        ranks = [0, 1, 2]
        rooms = client.allocate_many(name, ranks, dp_size)
        print(f"batch of 3 on {name}: bootstrap_room {rooms}, ranks {[decode_side(r, dp_size) for r in rooms]}")
        if [decode_side(r, dp_size) for r in rooms] != ranks:
            return 1
        # One prompt with n = 3 samples: one room; SGLang makes it room + i.
        room = client.allocate_block(name, 1, 3, dp_size)
        expanded = [room + i for i in range(3)]
        owners = [client.resolve(r) for r in expanded]
        print(f"n = 3 on {name}: bootstrap_room {room}, SGLang's items {expanded} on ranks "
              f"{[decode_side(r, dp_size) for r in expanded]}, all issued to {name}")
        if any(owner.prefill_worker != name or owner.dp_rank != (1 + i) % dp_size for i, owner in enumerate(owners)):
            return 1

        # An operator scales a prefill worker from dp_size 2 to 4; this router
        # has not heard yet.
        stale = "10.0.0.2:8998"
        client.register(stale, 4)
        try:
            client.allocate(stale, 1, prefill[stale])
            print("a room aligned to a stale dp_size was handed out", file=sys.stderr)
            return 1
        except DpSizeMismatch as error:
            print(
                f"dp_size mismatch: {error.worker} is registered with dp_size {error.registered}, "
                f"the router believed {error.requested}; refreshing the router's view"
            )
            prefill[stale] = error.registered
        room = client.allocate(stale, 3, prefill[stale])
        print(f"after the refresh: prefill {stale} rank 3/4 -> room {room}; decode pulls from rank {decode_side(room, 4)}")
        if decode_side(room, 4) != 3:
            return 1
        # Put the worker back as it was, so the example can run again.
        client.register(stale, 2)
    print("all rooms aligned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
