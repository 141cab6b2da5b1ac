"""``python -m room_allocator.sglang --allocator HOST:PORT [...] -- ROUTER_ARGS``:
SGLang's mini load balancer on allocator rooms (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import AllocatorOptions, run


def _split(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def _read(path: Optional[str], flag: str) -> Optional[bytes]:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SystemExit(f"{flag} {path}: {error.strerror or error}") from error


def _dp_sizes(items: Sequence[str]) -> Dict[str, int]:
    sizes: Dict[str, int] = {}
    for item in items:
        url, _, value = item.rpartition("=")
        if not url or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--prefill-dp-size {item}: expected URL=N with N >= 1, e.g. http://10.0.0.1:30000=8")
        sizes[url] = int(value)
    return sizes


def parse(argv: Sequence[str]) -> Tuple[AllocatorOptions, List[str]]:
    own, router_argv = _split(argv)
    parser = argparse.ArgumentParser(
        prog="python -m room_allocator.sglang",
        description="SGLang's mini load balancer (sglang_router.mini_lb) with every bootstrap room from "
        "room-allocator. ROUTER_ARGS after -- are those of python -m sglang_router.launch_router "
        "(--pd-disaggregation --mini-lb --prefill URL BOOTSTRAP_PORT ... --decode URL ... --host H --port P).",
    )
    parser.add_argument("--allocator", required=True, help="room-allocator's gRPC address, host:port or a URL")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token (needed to register workers on a server with a token)")
    token.add_argument("--token-file", help="file holding the bearer token")
    parser.add_argument("--tls-ca", help="PEM file of the CA that signed the allocator's certificate (TLS)")
    parser.add_argument("--tls-cert", help="PEM client certificate (mutual TLS, with --tls-key)")
    parser.add_argument("--tls-key", help="PEM client key (mutual TLS, with --tls-cert)")
    parser.add_argument("--tls-server-name", help="name to check the allocator's certificate against")
    parser.add_argument(
        "--prefill-dp-size",
        action="append",
        default=[],
        metavar="URL=N",
        help="dp_size of a prefill (its --prefill URL), instead of reading its GET /server_info",
    )
    args = parser.parse_args(own)
    if not router_argv:
        parser.error("give the router's arguments after --, e.g. -- --pd-disaggregation --mini-lb --prefill ...")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    token_value = args.token
    if args.token_file is not None:
        token_bytes = _read(args.token_file, "--token-file")
        token_value = token_bytes.decode().strip() if token_bytes is not None else None
    options = AllocatorOptions(
        target=args.allocator,
        token=token_value,
        root_certificates=_read(args.tls_ca, "--tls-ca"),
        private_key=_read(args.tls_key, "--tls-key"),
        certificate_chain=_read(args.tls_cert, "--tls-cert"),
        tls_server_name=args.tls_server_name,
        prefill_dp_sizes=_dp_sizes(args.prefill_dp_size),
    )
    return options, router_argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options, router_argv = parse(sys.argv[1:] if argv is None else argv)
    try:
        run(options, router_argv)
    except ImportError as error:
        print(
            f"room_allocator.sglang needs the sglang-router package ({error}): pip install 'room-allocator[sglang]'",
            file=sys.stderr,
        )
        return 2
    except ValueError as error:
        print(f"room_allocator.sglang: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
