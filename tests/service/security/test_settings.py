"""Security settings: which go together, and the checks of the certificate, key, CA and tokens files."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import pytest

from service.runtime.config import Settings
from service.security.auth import BearerTokens, SecurityConfigError, TokenWatcher, load_security, read_tokens
from tests.certs import CertificateAuthority

SECRET = "s3cr3t-token-value"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(folder, "main"), CertificateAuthority(folder, "other")
    server, stranger = ca.issue("server", server=True), other.issue("stranger", server=True)
    return {"ca": ca.cert, "cert": server.cert, "key": server.key, "other_key": stranger.key}


def settings(**env: str) -> Settings:
    return Settings.load(env={f"FRAUDSCORE_{k.upper()}": v for k, v in env.items()})


def test_security_is_off_by_default() -> None:
    s = settings()
    security = load_security(s)
    assert (security.transport, security.tokens, security.interceptors()) == ("plaintext", None, [])
    assert s.health_port == 0


@pytest.mark.parametrize(("env", "needles"), [
    ({"tls_cert_file": "/c.pem"}, ["FRAUDSCORE_TLS_KEY_FILE is missing", "FRAUDSCORE_TLS_CERT_FILE is set"]),
    ({"tls_key_file": "/k.pem"}, ["FRAUDSCORE_TLS_CERT_FILE is missing", "FRAUDSCORE_TLS_KEY_FILE is set"]),
    ({"tls_client_ca_file": "/ca.pem"}, ["FRAUDSCORE_TLS_CLIENT_CA_FILE is set", "mutual TLS"]),
    ({"health_port": "70000"}, ["FRAUDSCORE_HEALTH_PORT: must be 0..65535"]),
    ({"health_port": "50051"}, ["FRAUDSCORE_HEALTH_PORT: must differ from FRAUDSCORE_PORT"]),
    ({"auth_tokens_reload_s": "-1"}, ["FRAUDSCORE_AUTH_TOKENS_RELOAD_S"]),
])
def test_settings_that_go_together_are_refused_alone(env: dict[str, str], needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        settings(**env)
    for needle in needles:
        assert needle in str(info.value)


def test_tls_and_mutual_tls_load(pki: dict[str, Path]) -> None:
    tls = load_security(settings(tls_cert_file=str(pki["cert"]), tls_key_file=str(pki["key"])))
    assert tls.transport == "tls"
    mtls = load_security(settings(tls_cert_file=str(pki["cert"]), tls_key_file=str(pki["key"]),
                                  tls_client_ca_file=str(pki["ca"])))
    assert mtls.transport == "mtls"
    assert mtls.tls is not None and "BEGIN" not in repr(mtls.tls)  # no key or certificate in a repr
    assert mtls.tls.server_credentials() is not None


def _tls_error(tmp_path: Path, pki: dict[str, Path], **files: Path) -> str:
    env = {"tls_cert_file": str(files.get("cert", pki["cert"])), "tls_key_file": str(files.get("key", pki["key"]))}
    if "ca" in files:
        env["tls_client_ca_file"] = str(files["ca"])
    with pytest.raises(SecurityConfigError) as info:
        load_security(settings(**env))
    message = str(info.value)
    for path in (pki["cert"], pki["key"], pki["other_key"], pki["ca"]):  # no line of any PEM body
        assert not any(line in message for line in path.read_text().splitlines() if not line.startswith("-----"))
    return message


def test_missing_unreadable_and_wrong_files_are_named(tmp_path: Path, pki: dict[str, Path]) -> None:
    missing = tmp_path / "nope.crt"
    msg = _tls_error(tmp_path, pki, cert=missing)
    assert "FRAUDSCORE_TLS_CERT_FILE" in msg and str(missing) in msg and "no such file" in msg

    text = tmp_path / "text.crt"
    text.write_text("hello\n")
    msg = _tls_error(tmp_path, pki, cert=text)
    assert "FRAUDSCORE_TLS_CERT_FILE" in msg and "no PEM certificate" in msg and "tls.crt" in msg

    msg = _tls_error(tmp_path, pki, key=pki["cert"])  # the certificate given as the key
    assert "FRAUDSCORE_TLS_KEY_FILE" in msg and "no PEM private key" in msg

    msg = _tls_error(tmp_path, pki, key=pki["other_key"])  # a key that is not the certificate's
    assert "FRAUDSCORE_TLS_KEY_FILE" in msg and "OpenSSL refused" in msg and "its private key" in msg

    encrypted = tmp_path / "enc.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
    assert "encrypted" in _tls_error(tmp_path, pki, key=encrypted)

    msg = _tls_error(tmp_path, pki, ca=text)
    assert "FRAUDSCORE_TLS_CLIENT_CA_FILE" in msg and "not a PEM CA bundle" in msg

    broken = tmp_path / "broken-ca.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    assert "not a PEM CA bundle" in _tls_error(tmp_path, pki, ca=broken)

    unreadable = tmp_path / "unreadable.crt"
    unreadable.mkdir()  # reading a folder fails for root too
    assert "cannot be read" in _tls_error(tmp_path, pki, ca=unreadable)


def test_tokens_file_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# rotated 2026-11\n\n  {SECRET}  \nsecond\n{SECRET}\n")
    assert read_tokens(path) == (hashlib.sha256(SECRET.encode()).digest(), hashlib.sha256(b"second").digest())


@pytest.mark.parametrize(("content", "needle"), [
    ("", "no token in it"),
    ("# only a comment\n\n   \n", "no token in it"),
    (f"ok\n{SECRET} trailing-part\n", "line 2 has whitespace inside its token"),
    (f"{SECRET}\tx\n", "line 1 has whitespace inside its token"),
    (f"# x\n{SECRET}é\n", "line 2 has a character that gRPC metadata cannot carry"),
])
def test_bad_tokens_files_are_refused_without_printing_a_token(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(SecurityConfigError) as info:
        read_tokens(path)
    assert needle in str(info.value) and "FRAUDSCORE_AUTH_TOKENS_FILE" in str(info.value)
    assert SECRET not in str(info.value) and "trailing" not in str(info.value)


def test_a_missing_tokens_file_fails_start_up(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match=r"FRAUDSCORE_AUTH_TOKENS_FILE.*no such file"):
        load_security(settings(auth_tokens_file=str(tmp_path / "absent")))


@pytest.mark.parametrize(("metadata", "expected"), [
    ((), "authentication required"),
    ((("x-other", "1"),), "authentication required"),
    ((("authorization", SECRET),), "malformed"),
    ((("authorization", f"Basic {SECRET}"),), "malformed"),
    ((("authorization", "Bearer "),), "malformed"),
    ((("authorization", f"Bearer {SECRET} extra"),), "malformed"),
    ((("authorization", "Bearer wrong-token"),), "not accepted"),
    ((("authorization", f"Bearer {SECRET}x"),), "not accepted"),
    ((("authorization", f"Bearer {SECRET}"),), None),
    ((("x-other", "1"), ("authorization", f"bearer {SECRET}")), None),  # the scheme is case-insensitive
    ((("authorization", "Bearer second"),), None),
])
def test_bearer_check(metadata: tuple[tuple[str, str], ...], expected: str | None) -> None:
    tokens = BearerTokens((hashlib.sha256(SECRET.encode()).digest(), hashlib.sha256(b"second").digest()))
    why = tokens.refusal(metadata)
    if expected is None:
        assert why is None
    else:
        assert why is not None and expected in why and "authorization: Bearer <token>" in why
        assert SECRET not in why and "wrong-token" not in why


async def test_rotation_swaps_good_files_and_keeps_tokens_on_a_bad_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{SECRET}\n")
    security = load_security(settings(auth_tokens_file=str(path), auth_tokens_reload_s="0"))
    assert security.tokens is not None and security.watcher is not None
    tokens, watcher = security.tokens, security.watcher
    assert await watcher.check() is False  # unchanged content: nothing read again
    path.write_text("new-token\n")
    assert await watcher.check() is True
    assert tokens.refusal((("authorization", "Bearer new-token"),)) is None
    assert tokens.refusal((("authorization", f"Bearer {SECRET}"),)) is not None
    with caplog.at_level(logging.ERROR, logger="fraudscore.security"):
        path.write_text("bad token\n")
        assert await watcher.check() is False
    assert tokens.refusal((("authorization", "Bearer new-token"),)) is None  # the old set stays
    (record,) = [r for r in caplog.records if r.name == "fraudscore.security"]
    assert "refused" in record.getMessage() and "whitespace" in record.__dict__["reason"]
    assert "bad token" not in str(record.__dict__)
    assert await watcher.check() is False  # refused content is not retried until it changes


def test_watcher_runs_on_the_loop(tmp_path: Path) -> None:
    """Started and stopped as serve does: the task ends cleanly on cancel."""
    path = tmp_path / "tokens"
    path.write_text("a\n")
    watcher = TokenWatcher(path, BearerTokens(read_tokens(path)), interval_s=0.01, seen=None)

    async def run() -> None:
        watcher.start()
        await asyncio.sleep(0.05)
        await watcher.stop()

    asyncio.run(run())
