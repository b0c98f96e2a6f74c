"""Transport security and caller authentication: bearer tokens checked by a server interceptor,
the tokens file's rotation, and the port's TLS (service/security/tls.py) put together. docs/security.md.

What is read, and when: the TLS files and the tokens file at start-up, then again whenever their
content changes (`TlsReloader`, `TokenWatcher`), so a renewed certificate or a rotated Secret
takes effect without a restart.

What never leaves this module: a token, a key, a certificate's content. Errors name the
setting, the file, the line number and what was wrong with it; tokens are kept only as their
SHA-256 digests, so not even a stray repr can print one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service.runtime.config import ENV_PREFIX, Settings
from service.runtime.reload import RulesStamp, rules_stamp
from service.security.secret_files import FileWatch, SecurityConfigError, read_secret_file
from service.security.tls import TlsMaterial, TlsReloader, load_tls, tls_stamp

__all__ = ["BearerAuthInterceptor", "BearerTokens", "Security", "SecurityConfigError", "TlsMaterial", "TlsReloader",
           "TokenWatcher", "load_security", "load_tls", "read_tokens"]
log = logging.getLogger("fraudscore.security")

# Open without a token: the one call a probe makes (kubelet, `fraudscore health`). Not Health/Watch
# nor reflection: both are streams, and each open stream holds one of FRAUDSCORE_MAX_CONCURRENT_RPCS
# slots for as long as the caller likes, so unauthenticated streams could starve every scoring call.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
EXPECTED_HEADER = "metadata 'authorization: Bearer <token>'"


# --- Bearer tokens -----------------------------------------------------------------------------


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The SHA-256 digests of the tokens in `path`: one a line, blank lines and `#` lines skipped.
    Refuses a file with no token or a token with whitespace inside (naming the line, not the token)."""
    data = read_secret_file("AUTH_TOKENS_FILE", path, "bearer tokens, one a line")
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


# What the server does with a refused call before it ends: `(method, context, started)`, with
# `started` the call's perf_counter at interception (counts it, gives it a request id).
OnRefused = Callable[[str, grpc.aio.ServicerContext, float], None]


def _refusing(handler: grpc.RpcMethodHandler, message: str, method: str, started: float,
              on_refused: OnRefused | None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED. Its request is
    left undecoded: a caller without a token gets no parsing of what it sent."""
    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        if on_refused is not None:
            on_refused(method, context, started)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await refuse(_, context)
        yield  # pragma: no cover  (abort raises: this only makes the function a generator)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Lets a call through when it carries an accepted token (or is `Health/Check`, `OPEN_METHODS`);
    otherwise answers UNAUTHENTICATED before the request is decoded, after `on_refused`."""

    def __init__(self, tokens: BearerTokens, *, on_refused: OnRefused | None = None) -> None:
        self.tokens = tokens
        self._on_refused = on_refused

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method
        if method in OPEN_METHODS:
            return await continuation(handler_call_details)
        started = time.perf_counter()
        why = self.tokens.refusal(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if why is None or handler is None:  # an unknown method is UNIMPLEMENTED either way
            return handler
        return _refusing(handler, why, method, started, self._on_refused)


class TokenWatcher(FileWatch):
    """Re-reads the tokens file when its content changes: every `interval_s` (0: never) its stat
    is compared, the file read and hashed only when the stat moved (service/runtime/reload.py's stamps,
    which follow a Secret's `..data` symlink swap), and on `request` (SIGHUP). A file that is
    refused leaves the tokens in use and is logged with the reason; it is not retried until it
    changes again."""

    task_name = "auth-tokens-reload"
    what = "auth tokens"

    def __init__(self, path: Path, tokens: BearerTokens, *, interval_s: float, seen: RulesStamp | None) -> None:
        super().__init__(interval_s=interval_s, seen=seen)
        self.path = path
        self.tokens = tokens

    async def check(self, *, forced: bool = False) -> bool:
        """Swap in the file's tokens if its content changed (or `forced`); True when swapped."""
        stamp = await asyncio.to_thread(rules_stamp, self.path, self._seen)
        if not self._changed(stamp, forced=forced):
            return False
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
    tls_reloader: TlsReloader | None = None

    @property
    def watchers(self) -> list[FileWatch]:
        """The background tasks that re-read the files (started and stopped by `serve`)."""
        return [w for w in (self.watcher, self.tls_reloader) if w is not None]

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """The port's credentials, renewed with the files (None: plaintext)."""
        return self.tls_reloader.server_credentials() if self.tls_reloader is not None else None

    @property
    def transport(self) -> str:
        """"plaintext", "tls" or "mtls"."""
        return self.tls.mode if self.tls is not None else "plaintext"

    def interceptors(self, *, on_refused: OnRefused | None = None) -> list[Any]:
        """The server interceptors: the bearer check when tokens are configured, else none (no cost)."""
        return [] if self.tokens is None else [BearerAuthInterceptor(self.tokens, on_refused=on_refused)]


def load_security(settings: Settings) -> Security:
    """Read and check every security file; raise SecurityConfigError naming what to fix."""
    tls_seen = tls_stamp(settings) if settings.tls_cert_file is not None else None  # before reading, as below
    tls = load_tls(settings)
    reloader = (None if tls is None else
                TlsReloader(settings, tls, interval_s=settings.tls_reload_s, seen=tls_seen))
    if settings.auth_tokens_file is None:
        return Security(tls, None, None, reloader)
    seen = rules_stamp(settings.auth_tokens_file)  # stamped before reading: a change in between is seen
    tokens = BearerTokens(read_tokens(settings.auth_tokens_file))
    watcher = TokenWatcher(settings.auth_tokens_file, tokens, interval_s=settings.auth_tokens_reload_s, seen=seen)
    return Security(tls, tokens, watcher, reloader)
