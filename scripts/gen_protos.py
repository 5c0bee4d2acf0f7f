"""Regenerate the Python stubs of protos/ (the one codegen step of the project).

Run from the repository root: ``python scripts/gen_protos.py``. The stubs are
committed; ``tests/unit/protos/test_stubs.py`` fails when they drift from the
``.proto`` sources.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def proto_sources(root: Path = ROOT) -> list[Path]:
    """All .proto files under protos/, relative to the repository root."""
    return sorted(p.relative_to(root) for p in (root / "protos").rglob("*.proto"))


def generate(out_dir: Path, root: Path = ROOT) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every source into out_dir."""
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency only

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in proto_sources(root)],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
