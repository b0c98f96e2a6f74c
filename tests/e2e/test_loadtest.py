"""The locust file runs against a real server (loopback only): every call succeeds, outcomes are
reported, the simulator's fraud-like traffic is in the mix and is flagged (REVIEW/DECLINE) more
often than normal traffic, and locust's CSV stats are written; over mutual TLS with a bearer token
too."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.bench.redis_server import RedisServer
from tests.certs import CertificateAuthority, Issued
from tests.conftest import REPO, ServerProcess, start_server
from tests.e2e.helpers import scrape, value

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
    assert int(stats["ReportOutcome"]["Request Count"]) >= 1, "no outcome was reported"
    decisions = _rows(tmp_path / "run_decisions.csv", "Traffic")
    assert int(decisions["normal"]["APPROVE"]) > 0
    answered = {kind: sum(int(row[d]) for d in ("APPROVE", "REVIEW", "DECLINE")) for kind, row in decisions.items()}
    assert answered["fraud-like"] > 0, "no fraud-like traffic was sent"
    flagged = {kind: int(row["REVIEW"]) + int(row["DECLINE"]) for kind, row in decisions.items()}
    fraud_rate, normal_rate = (flagged[k] / answered[k] for k in ("fraud-like", "normal"))
    assert fraud_rate > normal_rate, f"fraud-like flagged {fraud_rate:.1%}, normal {normal_rate:.1%}: {decisions}"


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


TOKEN = "tok-loadtest.1"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path, Issued, Path]]:
    """A server with mutual TLS and bearer tokens (fallback rules: no model needed here)."""
    tmp = tmp_path_factory.mktemp("secured")
    ca = CertificateAuthority(tmp, "lt")
    server_cert, client = ca.issue("server", server=True), ca.issue("client", server=False)
    tokens = tmp / "tokens"
    tokens.write_text(f"# load test\n{TOKEN}\n")
    credentials = grpc.ssl_channel_credentials(ca.cert_pem, private_key=client.key_pem,
                                               certificate_chain=client.cert_pem)
    srv = start_server(tmp, model_dir=None, credentials=credentials, extra_env={
        "FRAUDSCORE_TLS_CERT_FILE": str(server_cert.cert), "FRAUDSCORE_TLS_KEY_FILE": str(server_cert.key),
        "FRAUDSCORE_TLS_CLIENT_CA_FILE": str(ca.cert), "FRAUDSCORE_AUTH_TOKENS_FILE": str(tokens)})
    yield srv, ca.cert, client, tokens
    srv.stop()


def test_locustfile_calls_over_mutual_tls_with_a_token(
        secured: tuple[ServerProcess, Path, Issued, Path], tmp_path: Path) -> None:
    srv, ca, client, tokens = secured
    tls = ["--grpc-tls-ca", str(ca), "--grpc-tls-cert", str(client.cert), "--grpc-tls-key", str(client.key)]
    small = ["-u", "2", "-r", "2", "-t", "3s", "--deadline-ms", "2000", "--sim-days", "1", "--sim-cards", "200"]
    result = _locust(srv.target, tmp_path, *small, *tls, "--token-file", str(tokens), "--csv", str(tmp_path / "ok"))
    assert result.returncode == 0, result.stdout + result.stderr
    stats = _rows(tmp_path / "ok_stats.csv", "Name")
    assert int(stats["Score"]["Request Count"]) > 0 and int(stats["Aggregated"]["Failure Count"]) == 0
    # Without the token every call is refused: the token really travels.
    result = _locust(srv.target, tmp_path, *small, *tls, "--csv", str(tmp_path / "no_token"))
    assert result.returncode == 1
    assert "UNAUTHENTICATED" in (tmp_path / "no_token_failures.csv").read_text()


def test_locustfile_refuses_incomplete_tls_options(tmp_path: Path) -> None:
    result = _locust("127.0.0.1:1", tmp_path, "-u", "1", "-r", "1", "-t", "1s", "--grpc-tls-cert", "c.pem")
    assert result.returncode != 0
    assert "--grpc-tls-cert and --grpc-tls-key go together" in result.stdout + result.stderr
    result = _locust("127.0.0.1:1", tmp_path, "-u", "1", "-r", "1", "-t", "1s", "--token-file", str(tmp_path / "none"))
    assert result.returncode != 0 and "cannot read" in result.stdout + result.stderr


def test_locustfile_spreads_its_users_over_several_servers_on_one_redis(tmp_path: Path, model_dir: Path,
                                                                      redis_server: RedisServer) -> None:
    """`--host a,b`: users dealt to two serving processes that share their state through Redis;
    both serve calls, none fails, none is degraded."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    servers = [start_server(tmp_path / name, model_dir=model_dir, state_dir=tmp_path / name / "state",
                            extra_env={"FRAUDSCORE_STATE_URL": redis_server.url}) for name in ("a", "b")]
    try:
        result = _locust(",".join(srv.target for srv in servers), tmp_path, "-u", "4", "-r", "4", "-t", "4s",
                         "--csv", str(tmp_path / "run"), "--deadline-ms", "2000", "--exit-code-on-error", "1",
                         "--sim-days", "2", "--sim-cards", "500")
        samples = [scrape(srv) for srv in servers]
    finally:
        for srv in servers:
            assert srv.stop() == 0
    assert result.returncode == 0, result.stdout + result.stderr
    stats = _rows(tmp_path / "run_stats.csv", "Name")
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    for s in samples:
        assert value(s, "fraudscore_requests_total", method="Score") > 10  # each server got its users' calls
    decisions = _rows(tmp_path / "run_decisions.csv", "Traffic")
    assert sum(int(row["degraded"]) for row in decisions.values()) == 0
