"""The README's example call works as written (against a real server on another port)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO, ServerProcess


def test_the_readme_python_example_scores_a_transaction(server: ServerProcess) -> None:
    readme = (REPO / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[:1]
    assert "127.0.0.1:50051" in snippet
    # The first call also opens the connection; on a loaded CI machine that alone can pass 50 ms.
    code = snippet.replace("127.0.0.1:50051", server.target).replace("timeout=0.05", "timeout=5")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    decision, probability, reasons = out.stdout.split(" ", 2)
    assert decision in ("APPROVE", "REVIEW", "DECLINE")
    assert 0.0 <= float(probability) <= 1.0
    assert reasons.startswith("[")
