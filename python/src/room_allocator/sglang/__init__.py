"""SGLang's own mini load balancer (``sglang_router.mini_lb`` of the
``sglang-router`` package, pure Python) with every bootstrap room from
room-allocator instead of ``random.randint``.

    python -m room_allocator.sglang --allocator HOST:PORT [--token T | --token-file F]
        [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--tls-server-name N]
        [--prefill-dp-size URL=N ...] -- ROUTER_ARGS

``ROUTER_ARGS`` are those of ``python -m sglang_router.launch_router``
(``--pd-disaggregation --mini-lb --prefill URL BOOTSTRAP_PORT ... --decode URL
... --host H --port P``). Everything but the room is the real LB's code: its
pair selection, its forwarding of the same body to prefill and decode, its
streaming and its other routes. Only the three routes that make a room
(``/generate``, ``/v1/completions``, ``/v1/chat/completions``) are replaced,
by handlers that set ``bootstrap_host``/``bootstrap_port`` exactly as the real
ones do and take the room from the allocator:

- the prefill worker's name is SGLang's bootstrap address
  ``host:bootstrap_port`` (IPv6 bracketed, as the real LB sends the host):
  the name the decode side and ResolveRank use;
- its dp_size comes from the prefill server's ``GET /server_info``
  (``dp_size``, or ``len(internal_states)``) or ``--prefill-dp-size URL=N``;
  it is registered at start and re-read on DP_SIZE_MISMATCH;
- the LB chooses the prefill DP rank, round robin per prefill, so ranks are
  evenly used;
- SGLang turns one ``bootstrap_room`` sent with a request of ``num`` items
  (batch size times ``sampling_params.n``) into ``room + i`` for item ``i``,
  and repeats a room list once per sample
  (``GenerateReqInput._normalize_bootstrap_params``,
  ``python/sglang/srt/managers/io_struct.py``). So a batch with ``n = 1``
  gets a list of rooms, one per item, each aligned to its own rank; any
  request with ``n > 1`` gets one room that starts a block of ``num``
  consecutive numbers no one else gets (``allocate_block``), and the rank
  rotation advances by ``num``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

import grpc

from .._aio import AsyncRoomClient
from ..errors import DpSizeMismatch, RoomAllocatorError

__all__ = ["AllocatorOptions", "PrefillWorker", "request_items", "run"]

log = logging.getLogger("room_allocator.sglang")

#: SGLang's default ``--disaggregation-bootstrap-port``: the port a decode
#: server puts in the bootstrap address when the request has none (the LB was
#: given ``--prefill URL`` without a port) and the prefill's /server_info
#: names none.
DEFAULT_BOOTSTRAP_PORT = 8998
#: Seconds the LB waits at start for each prefill's /server_info (the prefill
#: may still be loading its model).
SERVER_INFO_WAIT_SECS = 60.0
#: Seconds between two /server_info attempts.
SERVER_INFO_RETRY_SECS = 0.5
#: Seconds one /server_info request may take.
SERVER_INFO_TIMEOUT_SECS = 5.0
#: The routes of the real LB that make a room: replaced here.
ROOM_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")


@dataclass
class AllocatorOptions:
    """How to reach room-allocator."""

    target: str
    token: Optional[str] = None
    root_certificates: Optional[bytes] = None
    private_key: Optional[bytes] = None
    certificate_chain: Optional[bytes] = None
    tls_server_name: Optional[str] = None
    #: Prefill URL (as given to ``--prefill``) -> dp_size, instead of /server_info.
    prefill_dp_sizes: Dict[str, int] = field(default_factory=dict)

    def client(self) -> AsyncRoomClient:
        return AsyncRoomClient(
            self.target,
            token=self.token,
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
            tls_server_name=self.tls_server_name,
        )


@dataclass
class PrefillWorker:
    """One prefill server as the allocator knows it."""

    url: str
    #: The host as the real LB sends it in ``bootstrap_host``.
    host: str
    #: As given to ``--prefill`` (``None``: the request carries none).
    bootstrap_port: Optional[int]
    #: ``host:port`` of SGLang's bootstrap server: the allocator's worker name.
    name: str = ""
    dp_size: int = 0
    #: The next rank of the round robin (modulo dp_size).
    cursor: int = 0
    realign_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def take_ranks(self, num: int) -> int:
        """The first of ``num`` ranks in round-robin order; the rotation
        advances by ``num`` (SGLang puts item ``i`` on ``first + i``).
        No await: atomic on the event loop."""
        first = self.cursor % self.dp_size
        self.cursor = (first + num) % self.dp_size
        return first


def request_items(request: Dict[str, Any], endpoint: str) -> Tuple[Optional[int], int]:
    """``(batch_size, n)`` of a request as SGLang counts its items:
    ``batch_size`` is ``None`` for a single request (the real LB's
    ``_get_request_batch_size`` for /generate; a list ``prompt`` of
    /v1/completions), ``n`` the samples per item (``sampling_params.n`` of
    /generate, ``n`` of the OpenAI routes)."""
    if endpoint == "generate":
        if request.get("input_embeds") is not None:
            # SGLang batches input_embeds by their shape, which the real LB's
            # count ignores: one room would go out for several items, and
            # SGLang's room + i expansion would reach other requests' rooms.
            raise ValueError(
                "input_embeds requests are not routed: their items cannot be counted the way SGLang counts "
                "them, and a room for the wrong count would collide; send text or input_ids"
            )
        from sglang_router.mini_lb import _get_request_batch_size

        batch_size = _get_request_batch_size(request)
        params = request.get("sampling_params")
        if isinstance(params, list):
            # SGLang requires the same n in every item's sampling params.
            params = params[0] if params else None
        n = params.get("n", 1) if isinstance(params, dict) else 1
    else:
        batch_size = None
        prompt = request.get("prompt")
        if endpoint == "v1/completions" and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            batch_size = len(prompt)
        n = request.get("n", 1)
    n = 1 if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    return batch_size, n


def _server_info_dp_size(info: Dict[str, Any]) -> int:
    dp_size = info.get("dp_size")
    if dp_size is None:
        states = info.get("internal_states")
        dp_size = len(states) if isinstance(states, list) and states else None
    if not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"/server_info has no usable dp_size ({dp_size!r})")
    return dp_size


async def read_server_info(url: str) -> Dict[str, Any]:
    """The prefill server's ``GET /server_info`` (``/get_server_info`` on
    SGLang releases without it)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=SERVER_INFO_TIMEOUT_SECS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for path in ("/server_info", "/get_server_info"):
            async with session.get(url.rstrip("/") + path) as response:
                if response.status == 404:
                    continue
                response.raise_for_status()
                info = await response.json(content_type=None)
                if not isinstance(info, dict):
                    raise ValueError(f"{url}{path} did not answer a JSON object")
                return info
    raise ValueError(f"{url} serves neither /server_info nor /get_server_info")


class RoomSource:
    """The allocator side of the LB: the prefill workers and the client."""

    def __init__(self, options: AllocatorOptions, prefill_urls: Sequence[Tuple[str, Optional[int]]]) -> None:
        from sglang_router.mini_lb import maybe_wrap_ipv6_address

        self.options = options
        self.workers: Dict[Tuple[str, Optional[int]], PrefillWorker] = {}
        for url, bootstrap_port in prefill_urls:
            hostname = urllib.parse.urlparse(url).hostname
            if not hostname:
                raise ValueError(f"--prefill {url}: no host in the URL")
            self.workers[(url, bootstrap_port)] = PrefillWorker(url, maybe_wrap_ipv6_address(hostname), bootstrap_port)
        unknown = set(options.prefill_dp_sizes) - {url for url, _ in prefill_urls}
        if unknown:
            raise ValueError(f"--prefill-dp-size names no --prefill URL: {', '.join(sorted(unknown))}")
        self.client: Optional[AsyncRoomClient] = None

    async def start(self) -> None:
        """In the server's event loop: learns each prefill's name and
        dp_size, registers it, and warms the client up."""
        self.client = self.options.client()
        for worker in self.workers.values():
            info = await self._wait_for_server_info(worker)
            port = worker.bootstrap_port
            if port is None:
                port = info.get("disaggregation_bootstrap_port") or DEFAULT_BOOTSTRAP_PORT
            worker.name = f"{worker.host}:{port}"
            worker.dp_size = self.options.prefill_dp_sizes.get(worker.url) or _server_info_dp_size(info)
            await self.client.register(worker.name, worker.dp_size)
            log.info("prefill %s is allocator worker %s with dp_size %d", worker.url, worker.name, worker.dp_size)
        await self.client.warm_up([(worker.name, worker.dp_size) for worker in self.workers.values()])

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def _wait_for_server_info(self, worker: PrefillWorker) -> Dict[str, Any]:
        if worker.url in self.options.prefill_dp_sizes and worker.bootstrap_port is not None:
            return {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SERVER_INFO_WAIT_SECS
        while True:
            try:
                return await read_server_info(worker.url)
            except Exception as error:  # noqa: BLE001 - any failure is retried until the deadline
                if loop.time() >= deadline:
                    raise RuntimeError(
                        f"no /server_info from prefill {worker.url} within {SERVER_INFO_WAIT_SECS:.0f} s ({error}); "
                        f"start it first, or give --prefill-dp-size {worker.url}=N and a bootstrap port"
                    ) from error
            await asyncio.sleep(SERVER_INFO_RETRY_SECS)

    async def _realign(self, worker: PrefillWorker, seen_dp_size: int) -> None:
        """After DP_SIZE_MISMATCH: the prefill's dp_size is read again and
        registered (once for all requests that met the mismatch)."""
        assert self.client is not None
        async with worker.realign_lock:
            if worker.dp_size != seen_dp_size:
                return  # another request realigned meanwhile
            if worker.url in self.options.prefill_dp_sizes:
                dp_size = self.options.prefill_dp_sizes[worker.url]
            else:
                dp_size = _server_info_dp_size(await read_server_info(worker.url))
            await self.client.register(worker.name, dp_size)
            log.warning("prefill %s (%s) realigned from dp_size %d to %d", worker.url, worker.name, seen_dp_size, dp_size)
            worker.dp_size = dp_size
            worker.cursor = 0

    async def rooms(self, worker: PrefillWorker, batch_size: Optional[int], n: int) -> Any:
        """The ``bootstrap_room`` value for a request: one room (a block of
        ``num`` numbers when ``num > 1``) or, for a batch with ``n = 1``, a
        list of rooms. Retries once after a realignment."""
        client = self.client
        if client is None:
            raise RoomAllocatorError(grpc.StatusCode.UNAVAILABLE, "the LB has not finished starting; retry")
        num = (1 if batch_size is None else batch_size) * n
        for attempt in range(2):
            dp_size = worker.dp_size
            first = worker.take_ranks(num)
            try:
                if batch_size is not None and n == 1:
                    ranks = [(first + i) % dp_size for i in range(batch_size)]
                    return await client.allocate_many(worker.name, ranks, dp_size)
                if num == 1:
                    return await client.allocate(worker.name, first, dp_size)
                return await client.allocate_block(worker.name, first, num, dp_size)
            except DpSizeMismatch:
                if attempt == 1:
                    raise
                await self._realign(worker, dp_size)
        raise AssertionError("unreachable: the second attempt returns or raises")


def install(lb: Any, source: RoomSource) -> None:
    """Replaces the real LB's room-making routes with allocator ones and
    runs ``source`` with the server's lifespan."""
    from fastapi import HTTPException
    from sglang_router import mini_lb

    app = mini_lb.app
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) not in ROOM_ROUTES]

    async def forward(request_data: Dict[str, Any], endpoint: str) -> Any:
        prefill_server, bootstrap_port, decode_server = lb.select_pair()
        worker = source.workers[(prefill_server, bootstrap_port)]
        try:
            batch_size, n = request_items(request_data, endpoint)
        except (TypeError, ValueError, IndexError, AttributeError) as error:
            # The real LB would fail on these shapes too; SGLang would refuse them.
            raise HTTPException(status_code=400, detail=f"bad request: {error!r}") from error
        try:
            room = await source.rooms(worker, batch_size, n)
        except RoomAllocatorError as error:
            log.warning("no room for prefill %s: %s", worker.name, error)
            raise HTTPException(status_code=503, detail=f"room-allocator: {error}") from error
        modified_request = request_data.copy()
        if batch_size is not None:
            # As the real LB: a list host and port per item.
            modified_request.update(
                {"bootstrap_host": [worker.host] * batch_size, "bootstrap_port": [bootstrap_port] * batch_size}
            )
        else:
            modified_request.update({"bootstrap_host": worker.host, "bootstrap_port": bootstrap_port})
        modified_request["bootstrap_room"] = room
        if request_data.get("stream", False):
            return await lb.generate_stream(modified_request, prefill_server, decode_server, endpoint)
        return await lb.generate(modified_request, prefill_server, decode_server, endpoint)

    @app.post("/generate")
    async def handle_generate_request(request_data: dict) -> Any:  # type: ignore[type-arg]
        return await forward(request_data, "generate")

    @app.post("/v1/chat/completions")
    async def handle_chat_completion_request(request_data: dict) -> Any:  # type: ignore[type-arg]
        return await forward(request_data, "v1/chat/completions")

    @app.post("/v1/completions")
    async def handle_completion_request(request_data: dict) -> Any:  # type: ignore[type-arg]
        return await forward(request_data, "v1/completions")

    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        await source.start()
        try:
            async with inner(application) as state:
                yield state
        finally:
            await source.stop()

    app.router.lifespan_context = lifespan


def run(options: AllocatorOptions, router_argv: List[str]) -> None:
    """Parses ``router_argv`` as ``sglang_router.launch_router`` does and
    runs its MiniLoadBalancer on allocator rooms until it is stopped."""
    from sglang_router.launch_router import parse_router_args
    from sglang_router.mini_lb import MiniLoadBalancer

    router_args = parse_router_args(router_argv)
    if not router_args.mini_lb:
        raise ValueError(
            "only SGLang's mini LB (--mini-lb, pure Python) can take rooms from the allocator; add --mini-lb "
            "(the Rust router and smg make their own rooms: see docs/integration.md)"
        )
    lb = MiniLoadBalancer(router_args)
    source = RoomSource(options, list(zip(lb.prefill_urls, lb.prefill_bootstrap_ports)))
    install(lb, source)
    lb.start()
