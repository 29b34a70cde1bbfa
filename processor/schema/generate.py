"""Generates the Python classes of proto/backflow/v1 into processor/schema/backflow/v1/.

    .venv/bin/python -m processor.schema.generate

protoc comes from grpcio-tools (the ``test`` extra), pinned to one version: the generated
code names the protobuf release that made it, so another version writes other bytes.
tests/test_schema.py generates into a temporary folder and fails if the committed files
differ from what it gets.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"
PACKAGE = "backflow/v1"
OUT = Path(__file__).resolve().parent  # processor/schema: files land in backflow/v1/ below it


def protos() -> list[Path]:
    return sorted((PROTO / PACKAGE).glob("*.proto"))


def generate(out: Path = OUT) -> list[Path]:
    """Run protoc on every .proto of the package; the files written, relative to ``out``."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO}", f"--python_out={out}", f"--pyi_out={out}", *map(str, protos())]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p.relative_to(out) for p in (out / PACKAGE).glob("*_pb2.py*"))


def main() -> int:
    for path in generate():
        print(OUT / path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
