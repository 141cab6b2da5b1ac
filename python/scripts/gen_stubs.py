#!/usr/bin/env python3
"""Regenerates the checked-in gRPC stubs in ``src/room_allocator/_pb``.

The stubs are generated from ``proto/room_allocator/v1/room_allocator.proto``
(the repository's contract) with a pinned grpcio-tools, so that the output is
reproducible byte for byte: ``tests/test_stubs.py`` regenerates them into a
temporary directory and fails when they differ from the checked-in ones.

The proto is compiled with ``-I proto`` so that the descriptor keeps its
canonical name ``room_allocator/v1/room_allocator.proto`` (the name the
server's reflection serves), and the generated files are then moved into the
``room_allocator._pb`` package; the one absolute import protoc writes into the
``_grpc`` module is made relative, since ``room_allocator.v1`` is not a
package here.

Usage (from anywhere)::

    python python/scripts/gen_stubs.py            # rewrite src/room_allocator/_pb
    python python/scripts/gen_stubs.py --out DIR  # write to DIR instead
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

#: The grpcio-tools release the checked-in stubs come from. Its protoc emits
#: protobuf gencode 5.29.0 and its plugin requires grpcio >= 1.71.0 at run
#: time, which is what pyproject.toml asks for. Change the three together.
GRPCIO_TOOLS_VERSION = "1.71.0"

PYTHON_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = PYTHON_DIR.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = "room_allocator/v1/room_allocator.proto"
STUB_DIR = PYTHON_DIR / "src" / "room_allocator" / "_pb"
#: The files this script writes (``_pb/__init__.py`` is maintained by hand).
GENERATED = ("room_allocator_pb2.py", "room_allocator_pb2.pyi", "room_allocator_pb2_grpc.py")

_ABSOLUTE_IMPORT = "from room_allocator.v1 import room_allocator_pb2 as "
_RELATIVE_IMPORT = "from . import room_allocator_pb2 as "


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated files into ``out_dir``; returns their paths."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit(f"gen_stubs: needs grpcio-tools=={GRPCIO_TOOLS_VERSION}: pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}")
    from importlib.metadata import version

    installed = version("grpcio-tools")
    if installed != GRPCIO_TOOLS_VERSION:
        sys.exit(
            f"gen_stubs: grpcio-tools {installed} is installed, the stubs are pinned to "
            f"{GRPCIO_TOOLS_VERSION}: pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}"
        )
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as raw:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                str(PROTO_ROOT / PROTO_FILE),
            ]
        )
        if status != 0:
            sys.exit(f"gen_stubs: protoc failed with status {status}")
        written = []
        for name in GENERATED:
            text = (Path(raw) / "room_allocator" / "v1" / name).read_text(encoding="utf-8")
            if name.endswith("_grpc.py"):
                if text.count(_ABSOLUTE_IMPORT) != 1:
                    sys.exit(f"gen_stubs: protoc's import in {name} changed; update gen_stubs.py")
                text = text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT)
            target = out_dir / name
            target.write_text(text, encoding="utf-8")
            written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=STUB_DIR, help=f"output directory (default {STUB_DIR})")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
