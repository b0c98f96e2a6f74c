"""Generate the Python API package `fraudscore.v1` from the .proto files.

Run by `make proto`; the output (`*_pb2.py`, `*_pb2_grpc.py` and their `.pyi` stubs) is
never edited by hand and never committed. `tests/test_generated.py` regenerates into a
temporary folder and fails if the checked-out copy is stale.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("fraudscore/v1/fraudscore.proto",)


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) with the gRPC and mypy-protobuf plugins into `out_dir`."""
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency only

    include = Path(grpc_tools.__file__).parent / "_proto"
    plugin = shutil.which("protoc-gen-mypy_grpc", path=str(Path(sys.executable).parent))
    if plugin is None:
        raise SystemExit("protoc-gen-mypy_grpc not found next to this Python; install fraudscore[build]")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--mypy_grpc_out={out_dir}",
        *(str(PROTO_ROOT / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    produced = sorted(p for p in (out_dir / "fraudscore" / "v1").glob("*_pb2*.py*"))
    return produced


if __name__ == "__main__":
    for path in generate():
        print(f"generated {path.relative_to(PROTO_ROOT.parent) if path.is_relative_to(PROTO_ROOT.parent) else path}")
