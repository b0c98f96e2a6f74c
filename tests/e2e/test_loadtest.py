"""The locust file runs against a real server (loopback only): every call succeeds, the
simulator's fraud-like traffic is in the mix and gets REVIEW/DECLINE answers, and locust's
CSV stats are written."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, ServerProcess

LOCUST = Path(sys.executable).with_name("locust")


def _locust(host: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LOCUST), "-f", str(REPO / "loadtest" / "locustfile.py"), "--host", host, "--headless",
         "--only-summary", *extra],
        cwd=cwd, capture_output=True, text=True, timeout=90,
    )


def _rows(path: Path, key: str) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row[key]: row for row in csv.DictReader(f)}


def test_locustfile_drives_all_rpcs_with_fraud_like_traffic(server: ServerProcess, tmp_path: Path) -> None:
    # A small simulated world with 20x the fraud, so a few seconds of load surely hold some.
    result = _locust(server.target, tmp_path, "-u", "4", "-r", "4", "-t", "5s", "--csv", str(tmp_path / "run"),
                     "--deadline-ms", "2000", "--exit-code-on-error", "1",
                     "--fraud-scale", "20", "--sim-days", "2", "--sim-cards", "500")
    assert result.returncode == 0, result.stdout + result.stderr
    stats = _rows(tmp_path / "run_stats.csv", "Name")
    assert int(stats["Score"]["Request Count"]) > 20
    assert int(stats["ScoreBatch"]["Request Count"]) >= 1
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    assert stats["Score"]["99%"] not in ("", "N/A")  # latency percentiles as locust reports them
    assert (tmp_path / "run_stats_history.csv").stat().st_size > 0
    decisions = _rows(tmp_path / "run_decisions.csv", "Traffic")
    normal, fraud = decisions["normal"], decisions["fraud-like"]
    assert int(normal["APPROVE"]) > 0
    assert sum(int(fraud[d]) for d in ("APPROVE", "REVIEW", "DECLINE")) > 0, "no fraud-like traffic was sent"
    flagged = sum(int(row[d]) for row in (normal, fraud) for d in ("REVIEW", "DECLINE"))
    assert flagged > 0, decisions


def test_locustfile_refuses_a_non_loopback_host(tmp_path: Path) -> None:
    result = _locust("192.0.2.10:50051", tmp_path, "-u", "1", "-r", "1", "-t", "1s")
    assert result.returncode != 0
    assert "loopback" in result.stdout + result.stderr


def test_a_deadline_miss_is_a_failure(server: ServerProcess, tmp_path: Path) -> None:
    result = _locust(server.target, tmp_path, "-u", "1", "-r", "1", "-t", "2s", "--csv", str(tmp_path / "run"),
                     "--deadline-ms", "0.001", "--sim-days", "1", "--sim-cards", "200")
    assert result.returncode == 1, result.stdout + result.stderr  # locust's exit code when calls failed
    stats = _rows(tmp_path / "run_stats.csv", "Name")
    assert int(stats["Score"]["Failure Count"]) == int(stats["Score"]["Request Count"]) > 0
    assert "DEADLINE_EXCEEDED" in (tmp_path / "run_failures.csv").read_text()
