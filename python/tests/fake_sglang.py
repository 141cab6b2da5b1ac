"""Fake SGLang prefill and decode HTTP servers that apply SGLang's rules to
what a load balancer sends them, for the end-to-end test of
``room_allocator.sglang``.

The rules, as in SGLang's source (``sgl-project/sglang``):

- ``python/sglang/srt/managers/io_struct.py``,
  ``GenerateReqInput._normalize_bootstrap_params``: a request of ``num``
  items (batch size times ``n``; a single request with ``n > 1`` is a batch
  of one) turns a single ``bootstrap_room`` into ``[room + i for i in
  range(num)]`` and repeats a list of rooms (and hosts, ports) once per
  sample; a single request with ``n = 1`` keeps its room as it is.
- the prefill's scheduler sends item ``room`` to DP rank ``room % dp_size``
  (``follow_bootstrap_room``); the decode side pulls it from prefill rank
  ``room % prefill_dp_size``, the prefill being the bootstrap address
  ``host:port`` (a request without a port gets the decode server's own
  ``--disaggregation-bootstrap-port``).
- ``GET /server_info`` answers the server's args, ``dp_size`` among them.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class Item:
    """One item of a request after SGLang's normalisation."""

    room: int
    bootstrap: str
    #: The prefill DP rank this server sends or pulls it to/from.
    dp_rank: int


@dataclass
class Seen:
    """One request as a fake server received it."""

    role: str
    endpoint: str
    rid: str
    body: Dict[str, Any]
    items: List[Item]


def normalise(body: Dict[str, Any], endpoint: str) -> Tuple[List[Any], List[Any], List[Any]]:
    """Replays SGLang's normalisation of (host, port, room): one entry per
    item, in SGLang's item order."""
    if endpoint == "generate":
        text = body.get("text")
        input_ids = body.get("input_ids")
        if text is not None:
            batch = None if isinstance(text, str) else len(text)
        else:
            batch = None if isinstance(input_ids[0], int) else len(input_ids)
        params = body.get("sampling_params") or {}
        if isinstance(params, list):
            params = params[0]
        n = params.get("n", 1)
    else:
        prompt = body.get("prompt")
        batch = len(prompt) if endpoint == "v1/completions" and isinstance(prompt, list) and not isinstance(prompt[0], int) else None
        n = body.get("n", 1) or 1
    host, port, room = body.get("bootstrap_host"), body.get("bootstrap_port"), body.get("bootstrap_room")
    if batch is None and n == 1:
        return [host], [port], [room]
    num = (batch or 1) * n

    def expand(value: Any, consecutive: bool) -> List[Any]:
        if value is None:
            return [None] * num
        if not isinstance(value, list):
            return [value + i for i in range(num)] if consecutive else [value] * num
        return value * n

    return expand(host, False), expand(port, False), expand(room, True)


class FakeSglangServer:
    """A prefill or decode server on 127.0.0.1 or ::1 with a free port."""

    def __init__(
        self,
        role: str,
        *,
        host: str = "127.0.0.1",
        dp_size: int = 1,
        bootstrap_port: int = 8998,
        prefill_dp_sizes: Optional[Dict[str, int]] = None,
    ) -> None:
        self.role = role
        self.dp_size = dp_size
        #: This server's --disaggregation-bootstrap-port.
        self.bootstrap_port = bootstrap_port
        #: Decode: bootstrap address -> the prefill's dp_size (what the
        #: bootstrap server tells a real decode).
        self.prefill_dp_sizes = prefill_dp_sizes if prefill_dp_sizes is not None else {}
        self.seen: List[Seen] = []
        self.errors: List[str] = []
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        self._server = server_class((host, 0), self._handler())
        port = self._server.server_address[1]
        self.url = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _record(self, endpoint: str, body: Dict[str, Any]) -> None:
        hosts, ports, rooms = normalise(body, endpoint)
        items = []
        for host, port, room in zip(hosts, ports, rooms):
            if not isinstance(room, int):
                raise ValueError(f"bootstrap_room {room!r} is not an integer")
            bootstrap = f"{host}:{port if port is not None else self.bootstrap_port}"
            if self.role == "prefill":
                dp_rank = room % self.dp_size
            else:
                dp_rank = room % self.prefill_dp_sizes[bootstrap]
            items.append(Item(room, bootstrap, dp_rank))
        with self._lock:
            self.seen.append(Seen(self.role, endpoint, str(body.get("rid")), body, items))

    def _handler(self) -> type:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path in ("/server_info", "/get_server_info"):
                    info = {
                        "dp_size": fake.dp_size,
                        "disaggregation_mode": fake.role,
                        "disaggregation_bootstrap_port": fake.bootstrap_port,
                    }
                    self._send(200, json.dumps(info).encode(), "application/json")
                elif self.path in ("/health", "/health_generate"):
                    self._send(200, b"", "text/plain")
                else:
                    self._send(404, b"{}", "application/json")

            def do_POST(self) -> None:
                endpoint = self.path.lstrip("/")
                length = int(self.headers.get("Content-Length", "0"))
                try:
                    body = json.loads(self.rfile.read(length))
                    fake._record(endpoint, body)
                except Exception as error:  # noqa: BLE001 - reported to the test
                    with fake._lock:
                        fake.errors.append(f"{fake.role} {endpoint}: {error!r}")
                    self._send(400, json.dumps({"error": repr(error)}).encode(), "application/json")
                    return
                answer = {"text": f"{fake.role} ok", "rid": body.get("rid"), "meta_info": {"id": body.get("rid")}}
                if body.get("stream"):
                    chunks = f"data: {json.dumps(answer)}\n\ndata: [DONE]\n\n".encode()
                    self._send(200, chunks, "text/event-stream")
                else:
                    self._send(200, json.dumps(answer).encode(), "application/json")

        return Handler


@dataclass
class Cluster:
    prefills: List[FakeSglangServer] = field(default_factory=list)
    decodes: List[FakeSglangServer] = field(default_factory=list)

    def close(self) -> None:
        for server in self.prefills + self.decodes:
            server.close()
