"""TLS, mutual TLS, bearer tokens and the health port, over real server processes and real
channels, with certificates made in the test (docs/security.md)."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.certs import CertificateAuthority, Issued
from tests.conftest import REPO, ServerProcess, free_port, start_server
from tests.e2e.helpers import BASE_TIME_MS, scrape, txn, value

pytestmark = pytest.mark.e2e
SERVICE = "fraudscore.v1.FraudScoring"
TOKEN = "tok-AbC123.first"
SECOND = "tok-XyZ789.second"


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    server: Issued
    client: Issued
    other_ca: CertificateAuthority
    other_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(folder, "main"), CertificateAuthority(folder, "other")
    return Pki(ca, ca.issue("server", server=True), ca.issue("client", server=False), other,
               other.issue("other-client", server=False))


def tls(pki: Pki, *, client: Issued | None = None, ca: CertificateAuthority | None = None) -> grpc.ChannelCredentials:
    root = (ca or pki.ca).cert_pem
    if client is None:
        return grpc.ssl_channel_credentials(root)
    return grpc.ssl_channel_credentials(root, private_key=client.key_pem, certificate_chain=client.cert_pem)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Secured:
    srv: ServerProcess
    health_port: int
    tokens_file: Path


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Secured]:
    """TLS (server certificate only), bearer tokens re-read every 0.2 s, a plaintext health port."""
    tmp = tmp_path_factory.mktemp("tls-server")
    tokens = tmp / "tokens"
    tokens.write_text(f"# first set\n{TOKEN}\n\n")
    health_port = free_port()
    srv = start_server(tmp, model_dir=None, credentials=tls(pki), extra_env={
        "FRAUDSCORE_TLS_CERT_FILE": str(pki.server.cert), "FRAUDSCORE_TLS_KEY_FILE": str(pki.server.key),
        "FRAUDSCORE_AUTH_TOKENS_FILE": str(tokens), "FRAUDSCORE_AUTH_TOKENS_RELOAD_S": "0.2",
        "FRAUDSCORE_HEALTH_PORT": str(health_port)})
    yield Secured(srv, health_port, tokens)
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Secured]:
    """Mutual TLS, and tokens re-read on SIGHUP only."""
    tmp = tmp_path_factory.mktemp("mtls-server")
    tokens = tmp / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    srv = start_server(tmp, model_dir=None, credentials=tls(pki, client=pki.client), extra_env={
        "FRAUDSCORE_TLS_CERT_FILE": str(pki.server.cert), "FRAUDSCORE_TLS_KEY_FILE": str(pki.server.key),
        "FRAUDSCORE_TLS_CLIENT_CA_FILE": str(pki.ca.cert), "FRAUDSCORE_AUTH_TOKENS_FILE": str(tokens),
        "FRAUDSCORE_AUTH_TOKENS_RELOAD_S": "0"})
    yield Secured(srv, 0, tokens)
    srv.stop()


def _report() -> pb.ReportOutcomeRequest:
    t = txn()
    return pb.ReportOutcomeRequest(transaction_id=t.transaction_id, card_id=t.card_id, merchant_id=t.merchant_id,
                                   outcome=pb.CONFIRMED_LEGITIMATE, reported_time_ms=BASE_TIME_MS + 1000)


def _calls(stub: pb_grpc.FraudScoringStub, metadata: tuple[tuple[str, str], ...]) -> dict[str, Callable[[], object]]:
    """One call of each RPC, with `metadata`."""
    return {
        "Score": lambda: stub.Score(pb.ScoreRequest(transaction=txn()), metadata=metadata, timeout=10),
        "ScoreBatch": lambda: stub.ScoreBatch(pb.ScoreBatchRequest(transactions=[txn(), txn()]),
                                              metadata=metadata, timeout=10),
        "ScoreStream": lambda: list(stub.ScoreStream(iter([pb.ScoreRequest(transaction=txn()) for _ in range(3)]),
                                                     metadata=metadata, timeout=10)),
        "ReportOutcome": lambda: stub.ReportOutcome(_report(), metadata=metadata, timeout=10),
    }


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_tls_with_the_right_ca_and_a_token_serves_every_rpc(tls_server: Secured, pki: Pki) -> None:
    with grpc.secure_channel(tls_server.srv.target, tls(pki)) as ch:
        calls = _calls(pb_grpc.FraudScoringStub(ch), bearer(TOKEN))
        reply = calls["Score"]()
        assert isinstance(reply, pb.ScoreResponse) and 0.0 <= reply.fraud_probability <= 1.0
        batch = calls["ScoreBatch"]()
        assert isinstance(batch, pb.ScoreBatchResponse) and len(batch.results) == 2
        stream = calls["ScoreStream"]()
        assert isinstance(stream, list) and len(stream) == 3
        outcome = calls["ReportOutcome"]()
        assert isinstance(outcome, pb.ReportOutcomeResponse) and outcome.accepted


@pytest.mark.parametrize(("metadata", "needle"), [
    ((), "authentication required"),
    (bearer("not-a-token"), "bearer token not accepted"),
    ((("authorization", TOKEN),), "malformed authorization metadata"),
    ((("authorization", f"Basic {TOKEN}"),), "malformed authorization metadata"),
])
def test_calls_without_an_accepted_token_are_unauthenticated(
        tls_server: Secured, pki: Pki, metadata: tuple[tuple[str, str], ...], needle: str) -> None:
    before = scrape(tls_server.srv)
    with grpc.secure_channel(tls_server.srv.target, tls(pki)) as ch:
        for method, call in _calls(pb_grpc.FraudScoringStub(ch), metadata).items():
            code, details = _code(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, method
            assert needle in details and "authorization: Bearer <token>" in details, details
            assert TOKEN not in details and "not-a-token" not in details
    after = scrape(tls_server.srv)
    for method in ("Score", "ScoreBatch", "ScoreStream", "ReportOutcome"):
        for metric in ("fraudscore_requests_total", "fraudscore_request_duration_seconds_count"):
            delta = (value(after, metric, method=method, code="UNAUTHENTICATED")
                     - value(before, metric, method=method, code="UNAUTHENTICATED"))
            assert delta == 1, (metric, method)


def test_a_refused_call_gets_a_request_id_back(tls_server: Secured, pki: Pki) -> None:
    with grpc.secure_channel(tls_server.srv.target, tls(pki)) as ch, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=txn()), timeout=10,
                                           metadata=(("x-request-id", "req-no-token-1"),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(refused.value.trailing_metadata() or ()).get("x-request-id") == "req-no-token-1"  # type: ignore[attr-defined]


def test_only_health_check_is_open_without_a_token(tls_server: Secured, pki: Pki) -> None:
    """Health/Watch and reflection are streams: each open one holds a call slot, so without a token
    they are refused (a few hundred idle ones would otherwise shut out every scoring call)."""
    with grpc.secure_channel(tls_server.srv.target, tls(pki)) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        for metadata, expected in (((), grpc.StatusCode.UNAUTHENTICATED), (bearer(TOKEN), grpc.StatusCode.OK)):
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=5)
            assert _code(lambda w=watch: next(w))[0] == expected  # type: ignore[misc]
            watch.cancel()
            assert _code(lambda m=metadata: list(refl.ServerReflectionInfo(  # type: ignore[misc]
                iter([listing]), metadata=m, timeout=5)))[0] == expected
        (answer,) = refl.ServerReflectionInfo(iter([listing]), metadata=bearer(TOKEN), timeout=5)
        assert SERVICE in {s.name for s in answer.list_services_response.service}


def test_tls_port_refuses_a_wrong_ca_and_plaintext(tls_server: Secured, pki: Pki) -> None:
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.secure_channel(tls_server.srv.target, tls(pki, ca=pki.other_ca)) as ch, \
            pytest.raises(grpc.RpcError) as wrong_ca:
        health_pb2_grpc.HealthStub(ch).Check(request, timeout=5)
    assert wrong_ca.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(tls_server.srv.target) as ch, pytest.raises(grpc.RpcError) as plaintext:
        health_pb2_grpc.HealthStub(ch).Check(request, timeout=5)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_port_is_plaintext_and_health_only(tls_server: Secured) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as scoring:
            pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=txn()), metadata=bearer(TOKEN), timeout=5)
        assert scoring.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_watch_streams_cannot_fill_the_health_port(tls_server: Secured) -> None:
    """The port has 16 call slots; Watch is UNIMPLEMENTED there, so open Watch streams hold none
    and probes' Check calls keep being answered."""
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10) for _ in range(24)]
        try:
            for watch in watches:
                assert _code(lambda w=watch: next(w))[0] == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[misc]
            for _ in range(5):
                assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == \
                    health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as unknown:
                health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=2)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            for watch in watches:
                watch.cancel()


def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.1)


def _score_code(target: str, creds: grpc.ChannelCredentials, token: str) -> grpc.StatusCode:
    with grpc.secure_channel(target, creds) as ch:
        return _code(lambda: pb_grpc.FraudScoringStub(ch).Score(
            pb.ScoreRequest(transaction=txn()), metadata=bearer(token), timeout=10))[0]


def test_a_rotated_tokens_file_takes_effect_without_restart(tls_server: Secured, pki: Pki) -> None:
    target, creds, path = tls_server.srv.target, tls(pki), tls_server.tokens_file
    assert _score_code(target, creds, SECOND) == grpc.StatusCode.UNAUTHENTICATED
    # As a Secret volume does it: a new file beside, then swapped in by rename.
    staged = path.with_name("tokens.new")
    staged.write_text(f"{TOKEN}\n{SECOND}\n")
    os.replace(staged, path)
    _until(lambda: _score_code(target, creds, SECOND) == grpc.StatusCode.OK, "the added token accepted")
    assert _score_code(target, creds, TOKEN) == grpc.StatusCode.OK
    path.write_text(f"{SECOND}\n")  # in place: the first token is withdrawn
    _until(lambda: _score_code(target, creds, TOKEN) == grpc.StatusCode.UNAUTHENTICATED, "the old token refused")
    # A file that cannot be used keeps the tokens in use, and the log says why (never the token).
    path.write_text("broken token line\n")
    _until(lambda: "whitespace inside its token" in tls_server.srv.log(), "the refusal logged")
    assert "auth tokens refused" in tls_server.srv.log()
    assert _score_code(target, creds, SECOND) == grpc.StatusCode.OK
    path.write_text(f"{TOKEN}\n")  # restore for other tests
    _until(lambda: _score_code(target, creds, TOKEN) == grpc.StatusCode.OK, "the restored token accepted")


def test_start_up_logs_the_mode_and_no_secret(tls_server: Secured, pki: Pki) -> None:
    log = tls_server.srv.log()
    assert '"msg":"security"' in log and '"transport":"tls"' in log and '"auth":"bearer"' in log
    assert f'"health_port":{tls_server.health_port}' in log
    for secret in (TOKEN, SECOND, "broken token line"):
        assert secret not in log
    key_body = [line for line in pki.server.key.read_text().splitlines() if not line.startswith("-----")]
    assert not any(line in log for line in key_body)
    metrics = urllib_get(f"http://127.0.0.1:{tls_server.srv.metrics_port}/metrics")
    assert TOKEN not in metrics and SECOND not in metrics


def urllib_get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as resp:
        text: str = resp.read().decode()
        return text


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(mtls_server: Secured, pki: Pki) -> None:
    target = mtls_server.srv.target
    request = health_pb2.HealthCheckRequest(service="")
    for creds in (tls(pki), tls(pki, client=pki.other_client)):
        with grpc.secure_channel(target, creds) as ch, pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(ch).Check(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _score_code(target, tls(pki, client=pki.client), TOKEN) == grpc.StatusCode.OK
    assert '"transport":"mtls"' in mtls_server.srv.log()


def test_sighup_rereads_the_tokens_file(mtls_server: Secured, pki: Pki) -> None:
    target, creds = mtls_server.srv.target, tls(pki, client=pki.client)
    mtls_server.tokens_file.write_text(f"{SECOND}\n")
    time.sleep(0.3)
    assert _score_code(target, creds, SECOND) == grpc.StatusCode.UNAUTHENTICATED  # no polling: reload_s is 0
    mtls_server.srv.proc.send_signal(signal.SIGHUP)
    _until(lambda: _score_code(target, creds, SECOND) == grpc.StatusCode.OK, "the new token accepted")
    assert _score_code(target, creds, TOKEN) == grpc.StatusCode.UNAUTHENTICATED
    assert '"trigger":"signal"' in mtls_server.srv.log()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSCORE_")}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_health_command_probes_the_health_port_or_tls(tls_server: Secured, pki: Pki) -> None:
    port = str(tls_server.srv.port)
    by_env = _cli("health", env={"FRAUDSCORE_PORT": port, "FRAUDSCORE_HEALTH_PORT": str(tls_server.health_port)})
    assert (by_env.returncode, by_env.stdout.strip()) == (0, "SERVING"), by_env.stderr
    assert _cli("health", "--port", port).returncode == 1  # plaintext against the TLS port
    over_tls = _cli("health", "--port", port, "--tls-ca", str(pki.ca.cert))
    assert (over_tls.returncode, over_tls.stdout.strip()) == (0, "SERVING"), over_tls.stderr


def test_health_command_does_mutual_tls(mtls_server: Secured, pki: Pki) -> None:
    port = str(mtls_server.srv.port)
    ok = _cli("health", "--port", port, "--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert),
              "--tls-key", str(pki.client.key))
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    assert _cli("health", "--port", port, "--tls-ca", str(pki.ca.cert)).returncode == 1


def test_bad_security_configuration_stops_start_up_with_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    common = {"FRAUDSCORE_PORT": str(free_port()), "FRAUDSCORE_METRICS_PORT": "0",
              "FRAUDSCORE_STATE_DIR": "", "FRAUDSCORE_MODEL_DIR": ""}
    half = _cli("serve", env={**common, "FRAUDSCORE_TLS_CERT_FILE": str(pki.server.cert)})
    assert half.returncode == 2 and "FRAUDSCORE_TLS_KEY_FILE is missing" in half.stderr, half.stderr
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} oops\n")
    bad = _cli("serve", env={**common, "FRAUDSCORE_AUTH_TOKENS_FILE": str(tokens)})
    assert bad.returncode == 2 and "line 1 has whitespace inside its token" in bad.stderr, bad.stderr
    assert TOKEN not in bad.stderr and TOKEN not in bad.stdout


def test_sigterm_drains_and_closes_the_health_port_too(tls_server: Secured) -> None:
    assert tls_server.srv.stop() == 0
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as ch, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)


def _served_certificate(target: str) -> bytes:
    host, port = target.rsplit(":", 1)
    return ssl.get_server_certificate((host, int(port))).encode()


def _secret_volume(folder: Path, version: str, issued: Issued) -> None:
    """Write `issued` as a kubernetes.io/tls Secret volume does: files in a new timestamped folder,
    then the `..data` symlink swapped to it in one rename (tls.crt and tls.key point through it)."""
    data = folder / version
    data.mkdir()
    (data / "tls.crt").write_bytes(issued.cert_pem)
    (data / "tls.key").write_bytes(issued.key_pem)
    staged = folder / "..data_tmp"
    staged.symlink_to(version)
    os.replace(staged, folder / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")


def test_a_renewed_certificate_is_served_without_restart(tmp_path: Path, pki: Pki) -> None:
    secret = tmp_path / "tls"
    secret.mkdir()
    _secret_volume(secret, "..v1", pki.server)
    srv = start_server(tmp_path, model_dir=None, credentials=tls(pki), extra_env={
        "FRAUDSCORE_TLS_CERT_FILE": str(secret / "tls.crt"), "FRAUDSCORE_TLS_KEY_FILE": str(secret / "tls.key"),
        "FRAUDSCORE_TLS_RELOAD_S": "0.2"})
    try:
        first = ssl.PEM_cert_to_DER_cert(pki.server.cert_pem.decode())
        assert ssl.PEM_cert_to_DER_cert(_served_certificate(srv.target).decode()) == first
        renewed = pki.ca.issue("server-renewed", server=True)
        with grpc.secure_channel(srv.target, tls(pki)) as open_before:  # a connection made before the renewal
            stub = pb_grpc.FraudScoringStub(open_before)
            stub.Score(pb.ScoreRequest(transaction=txn()), timeout=10)
            _secret_volume(secret, "..v2", renewed)
            want = ssl.PEM_cert_to_DER_cert(renewed.cert_pem.decode())
            _until(lambda: ssl.PEM_cert_to_DER_cert(_served_certificate(srv.target).decode()) == want,
                   "the renewed certificate served")
            stub.Score(pb.ScoreRequest(transaction=txn()), timeout=10)  # still served on its connection
        assert _score_code(srv.target, tls(pki), "") == grpc.StatusCode.OK  # no tokens on this server
        # A pair that does not match is refused; the renewed certificate stays in use.
        _secret_volume(secret, "..v3", Issued(renewed.cert, pki.client.key))
        _until(lambda: "TLS files refused" in srv.log(), "the mismatched pair refused")
        assert ssl.PEM_cert_to_DER_cert(_served_certificate(srv.target).decode()) == want
        assert "TLS certificate reloaded" in srv.log() and "KEY_VALUES_MISMATCH" in srv.log()
    finally:
        assert srv.stop() == 0
    key_body = [line for line in renewed.key_pem.decode().splitlines() if not line.startswith("-----")]
    assert not any(line in srv.log() for line in key_body)
