"""TLS and mutual TLS on the gRPC port: the certificate, key and client CA, checked as OpenSSL
will use them, and renewed without a restart (docs/security.md, "Certificate renewal").

The port is served through `grpc.dynamic_ssl_server_credentials`: gRPC asks `TlsReloader` for a
new configuration at each handshake (a lock and an attribute read; None: keep the current one).
The files are polled like the tokens file (service/runtime/reload.py's stamps, which follow a Secret's
`..data` symlink swap); a renewed pair that OpenSSL accepts is served to new connections from the
next handshake, connections already open keep theirs. A refused one (half-written, a key that is
not the certificate's) leaves the certificate in use and is logged with OpenSSL's reason.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field

import grpc

from service.runtime.config import ENV_PREFIX, Settings
from service.runtime.reload import RulesStamp, rules_stamp
from service.security.secret_files import FileWatch, SecurityConfigError, read_secret_file

log = logging.getLogger("fraudscore.security")


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The PEM bytes grpc's server credentials take; `repr` shows no content."""

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(repr=False)

    @property
    def mode(self) -> str:
        return "mtls" if self.client_ca is not None else "tls"

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.private_key, self.cert_chain)],
                                                         root_certificates=self.client_ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Fixed credentials (read once); `TlsReloader.server_credentials` renews them."""
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def _no_password() -> bytes:
    return b""  # an encrypted key then fails to load instead of OpenSSL prompting on a terminal


def load_tls(settings: Settings) -> TlsMaterial | None:
    """The configured certificate, key and client CA, checked as OpenSSL will use them (the key
    matches the certificate, the CA bundle parses), or None when TLS is off."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None  # Settings.validate refused one without the other
    cert_path, key_path = settings.tls_cert_file, settings.tls_key_file
    chain = read_secret_file("TLS_CERT_FILE", cert_path, "a PEM certificate chain")
    key = read_secret_file("TLS_KEY_FILE", key_path, "a PEM private key")
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
        # OpenSSL reads the files again: a renewal landing in between is seen by the next poll
        # (the stamp taken before this read differs from the files then) and loaded again.
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
        client_ca = read_secret_file("TLS_CLIENT_CA_FILE", ca_path, "a PEM CA bundle")
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


class TlsReloader(FileWatch):
    """Serves the port's TLS material and renews it when the files' content changes: every
    `interval_s` (0: never) and on `request` (SIGHUP)."""

    task_name = "tls-reload"
    what = "TLS files"

    def __init__(self, settings: Settings, material: TlsMaterial, *, interval_s: float,
                 seen: RulesStamp | None) -> None:
        super().__init__(interval_s=interval_s, seen=seen)
        self.settings = settings
        self.material = material
        self._lock = threading.Lock()  # gRPC calls `_fetch` from its own threads
        self._pending: grpc.ServerCertificateConfiguration | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.material.certificate_configuration(), self._fetch,
            require_client_authentication=self.material.client_ca is not None)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC, at each handshake: a renewed configuration once, else None (keep the current one)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    async def check(self, *, forced: bool = False) -> bool:
        """Load the files again if their content changed (or `forced`); True when renewed."""
        stamp = await asyncio.to_thread(tls_stamp, self.settings, self._seen)
        if not self._changed(stamp, forced=forced):
            return False
        trigger = "signal" if forced else "file_changed"
        started = time.monotonic()
        try:
            material = await asyncio.to_thread(load_tls, self.settings)
        except SecurityConfigError as exc:
            log.error("TLS files refused; the certificate in use stays", extra={
                "setting": ENV_PREFIX + exc.setting, "path": str(exc.path), "trigger": trigger, "reason": exc.problem})
            return False
        if material is None or material == self.material:
            return False
        configuration = material.certificate_configuration()  # outside the lock gRPC's threads take
        with self._lock:
            self._pending = configuration
        self.material = material
        log.info("TLS certificate reloaded; new connections get it", extra={
            "trigger": trigger, "transport": material.mode, "took_ms": round((time.monotonic() - started) * 1000, 2)})
        return True


def tls_stamp(settings: Settings, previous: RulesStamp | None = None) -> RulesStamp:
    """The stamp of the certificate, key and client CA files (content read only when a stat moved)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise ValueError("TLS is off")
    others = [settings.tls_key_file] + ([settings.tls_client_ca_file] if settings.tls_client_ca_file else [])
    return rules_stamp(settings.tls_cert_file, previous, list_files=others)
