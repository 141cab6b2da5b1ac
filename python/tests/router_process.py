"""One router process for test_processes.py: allocates rooms with leases for
a list of workers and prints them, one JSON object per line.

    python router_process.py ADDRESS SEED COUNT WORKER:DP_SIZE [...]
"""

from __future__ import annotations

import json
import random
import sys
import time

from room_allocator import RoomClient


def main() -> None:
    address, seed, count, *specs = sys.argv[1:]
    workers = [(name, int(size)) for name, size in (spec.rsplit(":", 1) for spec in specs)]
    rng = random.Random(int(seed))
    deadline = time.monotonic() + 60
    out = []
    # A short lease age, so leases also expire and are replaced mid-run.
    with RoomClient(address, max_lease_age=0.2) as client:
        for i in range(int(count)):
            if time.monotonic() > deadline:
                sys.exit("router_process: ran out of time")
            name, dp_size = workers[rng.randrange(len(workers))]
            dp_rank = rng.randrange(dp_size)
            room = client.allocate(name, dp_rank, dp_size)
            out.append({"w": name, "s": dp_size, "r": dp_rank, "room": room})
            if i % 1000 == 999:
                time.sleep(0.05)  # routers pause; some leases expire meanwhile
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
