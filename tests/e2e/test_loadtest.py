"""The locust file runs against a real server (loopback only) and every call succeeds."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, ServerProcess


def test_locustfile_drives_all_rpcs_without_failures(server: ServerProcess, tmp_path: Path) -> None:
    locust = Path(sys.executable).with_name("locust")
    result = subprocess.run(
        [str(locust), "-f", str(REPO / "loadtest" / "locustfile.py"), "--host", server.target, "--headless",
         "-u", "4", "-r", "4", "-t", "4s", "--only-summary", "--csv", str(tmp_path / "run"),
         "--deadline-ms", "2000", "--exit-code-on-error", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with (tmp_path / "run_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Score"]["Request Count"]) > 20
    assert int(rows["ScoreBatch"]["Request Count"]) >= 1
    assert int(rows["Aggregated"]["Failure Count"]) == 0
