"""Transport security and caller authentication: TLS or mutual TLS on the gRPC port, bearer
tokens checked by a server interceptor, and the tokens file's rotation. docs/security.md.

What is read, and when: the TLS files once, at start-up (a new certificate takes a restart:
a rolling one in Kubernetes); the tokens file at start-up, then again whenever its content
changes (`TokenWatcher`), so a rotated Secret takes effect without a restart.

What never leaves this module: a token, a key, a certificate's content. Errors name the
setting, the file, the line number and what was wrong with it; tokens are kept only as their
SHA-256 digests, so not even a stray repr can print one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from core.errors import FraudscoreError
from service.config import ENV_PREFIX, Settings
from service.reload import RulesStamp, WatchTask, rules_stamp

log = logging.getLogger("fraudscore.security")

# Open without a token: probes (kubelet, `fraudscore health`) and API discovery. Reflection
# tells a caller only the public .proto, which grants nothing.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
EXPECTED_HEADER = "metadata 'authorization: Bearer <token>'"


class SecurityConfigError(FraudscoreError):
    """A TLS or tokens file that cannot be used; the message names the setting and what to do."""

    def __init__(self, setting: str, path: Path, problem: str, remedy: str) -> None:
        self.setting, self.path, self.problem = setting, path, problem
        super().__init__(f"{ENV_PREFIX}{setting} ({path}): {problem}; {remedy}")


# --- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The PEM bytes grpc.ssl_server_credentials takes; `repr` shows no content."""

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(repr=False)

    @property
    def mode(self) -> str:
        return "mtls" if self.client_ca is not None else "tls"

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def _read(setting: str, path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SecurityConfigError(setting, path, f"no such file; expected {what}",
                                  "check the path and that the Secret is mounted there") from None
    except OSError as exc:
        raise SecurityConfigError(setting, path, f"cannot be read ({exc.strerror}); expected {what}",
                                  "make it readable by the server's user") from None


def _no_password() -> bytes:
    return b""  # an encrypted key then fails to load instead of OpenSSL prompting on a terminal


def load_tls(settings: Settings) -> TlsMaterial | None:
    """The configured certificate, key and client CA, checked as OpenSSL will use them (the key
    matches the certificate, the CA bundle parses), or None when TLS is off."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None  # Settings.validate refused one without the other
    cert_path, key_path = settings.tls_cert_file, settings.tls_key_file
    chain = _read("TLS_CERT_FILE", cert_path, "a PEM certificate chain")
    key = _read("TLS_KEY_FILE", key_path, "a PEM private key")
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise SecurityConfigError("TLS_CERT_FILE", cert_path, "no PEM certificate in it (expected "
                                  "'-----BEGIN CERTIFICATE-----')", "point it at the server certificate chain "
                                  "(tls.crt of a kubernetes.io/tls Secret)")
    if b"PRIVATE KEY-----" not in key:
        raise SecurityConfigError("TLS_KEY_FILE", key_path, "no PEM private key in it (expected "
                                  "'-----BEGIN PRIVATE KEY-----' or similar)",
                                  "point it at the certificate's private key (tls.key of a kubernetes.io/tls Secret)")
    if b"ENCRYPTED" in key:
        raise SecurityConfigError("TLS_KEY_FILE", key_path, "the private key is encrypted",
                                  "gRPC needs an unencrypted key: decrypt it (openssl pkey -in KEY -out KEY.plain) "
                                  "and keep it in a Secret instead")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # Never prompts (the password callback refuses): an encrypted key fails here, not on a tty.
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except ssl.SSLError as exc:
        # OpenSSL's reason (e.g. KEY_VALUES_MISMATCH) names the problem, never the content.
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        raise SecurityConfigError("TLS_KEY_FILE", key_path, f"OpenSSL refused the certificate and key ({reason})",
                                  f"check that {ENV_PREFIX}TLS_CERT_FILE is PEM and that this is its private key"
                                  ) from None
    client_ca = None
    if settings.tls_client_ca_file is not None:
        ca_path = settings.tls_client_ca_file
        client_ca = _read("TLS_CLIENT_CA_FILE", ca_path, "a PEM CA bundle")
        try:
            if b"-----BEGIN CERTIFICATE-----" not in client_ca:
                raise ssl.SSLError("no PEM certificate")
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "reason", None) or str(exc.args[0] if exc.args else exc.__class__.__name__)
            raise SecurityConfigError("TLS_CLIENT_CA_FILE", ca_path, f"not a PEM CA bundle ({reason})",
                                      "point it at the PEM certificate(s) of the CA that signs client "
                                      "certificates (ca.crt)") from None
    return TlsMaterial(chain, key, client_ca)


# --- Bearer tokens -----------------------------------------------------------------------------


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The SHA-256 digests of the tokens in `path`: one a line, blank lines and `#` lines skipped.
    Refuses a file with no token or a token with whitespace inside (naming the line, not the token)."""
    data = _read("AUTH_TOKENS_FILE", path, "bearer tokens, one a line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecurityConfigError("AUTH_TOKENS_FILE", path, "not UTF-8 text", "write one token a line") from None
    digests: list[bytes] = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(c.isspace() for c in token):
            raise SecurityConfigError("AUTH_TOKENS_FILE", path, f"line {number} has whitespace inside its token",
                                      "write exactly one token a line, with no spaces in it")
        if not (token.isascii() and token.isprintable()):
            # gRPC metadata carries printable ASCII only: such a token could never be sent.
            raise SecurityConfigError("AUTH_TOKENS_FILE", path, f"line {number} has a character that gRPC "
                                      "metadata cannot carry", "use printable ASCII only (e.g. base64url tokens)")
        digests.append(hashlib.sha256(token.encode()).digest())
    if not digests:
        raise SecurityConfigError("AUTH_TOKENS_FILE", path, "no token in it (only blank or # lines)",
                                  f"add at least one token, or unset {ENV_PREFIX}AUTH_TOKENS_FILE to turn "
                                  "authentication off")
    return tuple(dict.fromkeys(digests))


class BearerTokens:
    """The accepted tokens (as digests) and the check of one call's metadata."""

    __slots__ = ("digests",)

    def __init__(self, digests: tuple[bytes, ...]) -> None:
        self.digests = digests  # replaced whole on rotation (event loop only)

    def refusal(self, metadata: Any) -> str | None:
        """None when `metadata` carries an accepted bearer token; else why not (never echoing it).

        The presented token is hashed first, so every comparison is of 32 bytes with 32 bytes,
        and compared with every accepted digest without stopping at a match: the time taken says
        neither how much of a token matched, nor which token, nor how long they are.
        """
        value = None
        for key, v in metadata or ():
            if key == "authorization":
                value = v
                break
        if value is None:
            return f"authentication required: send {EXPECTED_HEADER}"
        scheme, _, token = value.partition(" ") if isinstance(value, str) else ("", "", "")
        if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
            return f"malformed authorization metadata: expected {EXPECTED_HEADER} (the word Bearer, one space, the token)"
        presented = hashlib.sha256(token.encode()).digest()
        accepted = False
        for digest in self.digests:
            accepted |= hmac.compare_digest(presented, digest)
        return None if accepted else (f"bearer token not accepted: expected {EXPECTED_HEADER} with one of the "
                                      "tokens this server is configured with")


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED. Its request is
    left undecoded: a caller without a token gets no parsing of what it sent."""
    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (abort raises: this only makes the function a generator)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Lets a call through when it carries an accepted token (or is health or reflection);
    otherwise answers UNAUTHENTICATED before the request is decoded. `on_refused(method)` counts it."""

    def __init__(self, tokens: BearerTokens, *, on_refused: Callable[[str], None] | None = None) -> None:
        self.tokens = tokens
        self._on_refused = on_refused

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        why = self.tokens.refusal(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if why is None or handler is None:  # an unknown method is UNIMPLEMENTED either way
            return handler
        if self._on_refused is not None:
            self._on_refused(method)
        return _refusing(handler, why)


class TokenWatcher(WatchTask):
    """Re-reads the tokens file when its content changes: every `interval_s` (0: never) its stat
    is compared, the file read and hashed only when the stat moved (service/reload.py's stamps,
    which follow a Secret's `..data` symlink swap), and on `request` (SIGHUP). A file that is
    refused leaves the tokens in use and is logged with the reason; it is not retried until it
    changes again."""

    task_name = "auth-tokens-reload"

    def __init__(self, path: Path, tokens: BearerTokens, *, interval_s: float, seen: RulesStamp | None) -> None:
        super().__init__()
        self.path = path
        self.tokens = tokens
        self._interval_s = interval_s
        self._seen = seen

    async def _run(self) -> None:
        while True:
            timeout = self._interval_s if self._interval_s > 0 else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._requested.wait(), timeout=timeout)
            forced = self._requested.is_set()
            self._requested.clear()
            try:
                await self.check(forced=forced)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("auth tokens check failed; the tokens in use stay", extra={"error": exc.__class__.__name__})

    async def check(self, *, forced: bool = False) -> bool:
        """Swap in the file's tokens if its content changed (or `forced`); True when swapped."""
        stamp = await asyncio.to_thread(rules_stamp, self.path, self._seen)
        if not forced and self._seen is not None and stamp.digest == self._seen.digest:
            self._seen = stamp
            return False
        self._seen = stamp
        trigger = "signal" if forced else "file_changed"
        started = time.monotonic()
        try:
            digests = await asyncio.to_thread(read_tokens, self.path)
        except SecurityConfigError as exc:
            log.error("auth tokens refused; the previous tokens stay in use", extra={
                "path": str(self.path), "trigger": trigger, "reason": exc.problem,
                "tokens": len(self.tokens.digests)})
            return False
        self.tokens.digests = digests
        log.info("auth tokens reloaded", extra={"path": str(self.path), "trigger": trigger, "tokens": len(digests),
                                                "took_ms": round((time.monotonic() - started) * 1000, 2)})
        return True


@dataclass(frozen=True, slots=True)
class Security:
    """What `serve` needs: the port's TLS material (None: plaintext), the tokens and their watcher
    (None: no authentication)."""

    tls: TlsMaterial | None
    tokens: BearerTokens | None
    watcher: TokenWatcher | None

    @property
    def transport(self) -> str:
        """"plaintext", "tls" or "mtls"."""
        return self.tls.mode if self.tls is not None else "plaintext"

    def interceptors(self, *, on_refused: Callable[[str], None] | None = None) -> list[Any]:
        """The server interceptors: the bearer check when tokens are configured, else none (no cost)."""
        return [] if self.tokens is None else [BearerAuthInterceptor(self.tokens, on_refused=on_refused)]


def load_security(settings: Settings) -> Security:
    """Read and check every security file; raise SecurityConfigError naming what to fix."""
    tls = load_tls(settings)
    if settings.auth_tokens_file is None:
        return Security(tls, None, None)
    seen = rules_stamp(settings.auth_tokens_file)  # stamped before reading: a change in between is seen
    tokens = BearerTokens(read_tokens(settings.auth_tokens_file))
    watcher = TokenWatcher(settings.auth_tokens_file, tokens, interval_s=settings.auth_tokens_reload_s, seen=seen)
    return Security(tls, tokens, watcher)
