"""The generated API code is produced by the build from protos/, never edited by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from protos.generate import PROTO_ROOT, generate

GENERATED = ("fraudscore_pb2.py", "fraudscore_pb2.pyi", "fraudscore_pb2_grpc.py", "fraudscore_pb2_grpc.pyi")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / "fraudscore" / "v1" / name).read_text()
        checked_out = (PROTO_ROOT / "fraudscore" / "v1" / name).read_text()
        assert checked_out == fresh, f"{name} is stale: run `make proto`"


def test_generated_code_is_not_committed() -> None:
    tracked = subprocess.run(["git", "ls-files", "protos"], cwd=PROTO_ROOT.parent, capture_output=True, text=True,
                             check=True).stdout.split()
    assert not [p for p in tracked if "_pb2" in p]


def test_serving_imports_no_training_library() -> None:
    code = "import sys, service.runtime.server; bad = {'lightgbm', 'pyarrow', 'tqdm', 'matplotlib'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROTO_ROOT.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
