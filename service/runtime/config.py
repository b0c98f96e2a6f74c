"""Settings: one frozen object, read once at start-up from `FRAUDSCORE_*` environment
variables, then from command-line flags (flags win). Nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.features.state import DEFAULT_CARD_CAPACITY, DEFAULT_ENTITY_CAPACITY

ENV_PREFIX = "FRAUDSCORE_"
STATE_URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://", "redis+sentinel://",
                     "rediss+sentinel://")
DEFAULT_ID_HASH_KEY = "fraudscore-default-key"  # development only: the server warns when it is in use


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the server. Each field is `FRAUDSCORE_<NAME>` in the environment."""

    host: str = "127.0.0.1"
    """Address the gRPC port binds to. Use 0.0.0.0 in a container."""
    port: int = 50051
    """gRPC port (0 picks a free one, printed in the start-up log)."""
    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus /metrics HTTP endpoint."""
    metrics_port: int = 9464
    """Port of /metrics (0 disables the endpoint)."""
    model_dir: Path | None = Path("models/default")
    """Model directory (model.txt + manifest.json). Missing or unloadable: serve from the fallback rules."""
    challenger_model_dir: Path | None = None
    """Champion/challenger: a second model directory, loaded at start-up with the same checks, scored
    in shadow on the batches the model answers. Its scores feed metrics only
    (`fraudscore_challenger_*`), never an answer. Missing or refused: logged, and the service runs
    without one. Unset: no challenger."""
    rules_file: Path | None = None
    """Rules file (JSON). Unset: the packaged defaults (service/defaults/rules.json)."""
    rules_reload_s: float = 5.0
    """Seconds between checks of the rules file for a change (its content, so a Kubernetes
    ConfigMap's symlink swap counts); a changed file is validated and swapped in, an invalid
    one refused. 0: only on SIGHUP. docs/rules.md, "Changing rules in production"."""
    model_reload_s: float = 5.0
    """Seconds between checks of the model directory's manifest.json and model.txt for a change
    (their content); a changed model is loaded, checked, warmed and swapped in between batches,
    one that cannot be used refused. 0: only on SIGHUP (which reloads the rules too)."""
    state_dir: Path | None = Path("state")
    """Where entity state is snapshotted and restored. Unset: state lives in memory only."""
    snapshot_interval_s: float = 300.0
    """Seconds between periodic state snapshots (a final one is always taken at shutdown)."""
    state_url: str | None = field(default=None, repr=False)
    """Entity state shared by every process and pod pointed at it: a Redis URL,
    redis://[user:password@]host:port/db (rediss:// for TLS), a Cluster's
    redis+cluster://[user:password@]host:port[,host:port…] or Sentinel's
    redis+sentinel://[user:password@]host:port[,host:port…]/master-name[/db]. Unset: state lives
    in this process (snapshotted to `state_dir`). Its password is never logged. docs/state-store.md."""
    state_url_file: Path | None = None
    """A file holding `state_url` instead (a mounted Secret, as the password is in it)."""
    state_ca_file: Path | None = None
    """PEM CA bundle that signed the Redis's TLS certificate (a private CA), for the rediss://…
    forms of `state_url`; unset: the system's trusted CAs."""
    workers: int = 1
    """Serving processes in this pod, all on one port (SO_REUSEPORT: the kernel spreads new
    connections over them), under one supervising process that serves the pod's summed metrics
    on `metrics_port`. More than 1 needs `state_url` (one shared state). docs/deploy.md."""
    state_ttl_s: float = 35 * 24 * 3600.0
    """With a shared store: an entity not seen for this long is forgotten (every write refreshes its TTL)."""
    state_timeout_ms: float = 20.0
    """With a shared store: the longest wait for one store command (a batch makes two round trips:
    claim with read, then write; in a Cluster each is one pipeline per master, sent at once). Past it, or
    when the store is down, the batch is answered by the fallback rules (degraded, reason
    state_store_unavailable) and does not enter the state; the next batch tries again."""
    budget_ms: float = 50.0
    """Service budget per pipeline call; a request still queued when it runs out is answered at
    once by the fallback rules (degraded). A ScoreBatch of k × max_batch gets k budgets."""
    max_batch: int = 64
    """Most transactions scored in one pipeline call."""
    max_wait_us: int = 0
    """How long the first request of a batch may wait for company while the pipeline is idle.
    0: never wait; requests that arrive while a batch runs are batched together anyway."""
    max_queue: int = 2048
    """Transactions waiting for the pipeline at most; past it new calls are shed (`shed_mode`).
    Calls that would miss their budget are answered by the fallback before the queue fills."""
    shed_mode: str = "refuse"
    """Past `max_queue`: "refuse" answers RESOURCE_EXHAUSTED (the client retries with backoff);
    "fallback" answers at once from the fallback rules (degraded, reason queue_full)."""
    max_batch_request: int = 1000
    """Most transactions in one ScoreBatch call."""
    max_stream_messages: int = 10_000_000
    """Most messages in one ScoreStream; past it the stream ends with RESOURCE_EXHAUSTED (open a new one)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted."""
    max_concurrent_rpcs: int = 32
    """Calls the server works on at once on its gRPC port (every method; an open ScoreStream holds
    one for its life). gRPC itself enforces it, before any Python runs: past it a call waits in
    gRPC's own queue (`max_pending_rpcs`) or is refused RESOURCE_EXHAUSTED. Sized for latency, not
    capacity: answers take about this many divided by the peak rate (32 / 1,500 per s ≈ 21 ms on the
    2-core reference machine); raise it by the number of ScoreStreams clients keep open
    (docs/design.md, "Overload: refused by gRPC, early")."""
    max_pending_rpcs: int = 16
    """Calls gRPC holds while `max_concurrent_rpcs` are in the server, before any handler; past half
    of it gRPC starts dropping new ones, past it all (the client sees RESOURCE_EXHAUSTED or CANCELLED;
    nothing was recorded: retry with backoff). Small on purpose: a call waits there where no budget
    applies, and dropping it in gRPC costs the server no Python. Too small, and a stall of the event
    loop (a GC pause, a busy neighbour on the host) drops calls at moderate load: half of it is the
    burst it absorbs (8 calls: 8 ms at 1,000/s)."""
    max_connection_age_s: float = 300.0
    """A client connection is closed (GOAWAY, then `shutdown_grace_s` for its calls to finish) after
    about this many seconds (gRPC adds ±10 % jitter); clients reconnect, through the load balancer,
    so pods added by an autoscaler get their share. 0: never."""
    max_clock_skew_s: float = 300.0
    """event_time_ms and reported_time_ms may be at most this far ahead of the server's clock:
    a future-dated event would freeze its entities' decayed counters until then."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM: seconds to finish in-flight calls before they are cancelled."""
    idempotency_ttl_s: float = 24 * 3600.0
    """How long a transaction_id's answer is kept for identical retries."""
    idempotency_max_entries: int = 200_000
    """Most remembered answers; the oldest go first beyond this."""
    id_hash_key: str = field(default=DEFAULT_ID_HASH_KEY, repr=False)
    """Secret for the keyed hash (keyed BLAKE2b) of identifiers in state, as text (its UTF-8 bytes are the
    key). Set your own, at least 16 random bytes; changing it forgets all state. Never logged. The offline
    commands (train, replay, evaluate, backtest, rules check) read it too: features depend on it."""
    id_hash_key_file: Path | None = None
    """A file holding `id_hash_key` instead (a mounted Secret): its UTF-8 text, less one trailing newline.
    Set this or FRAUDSCORE_ID_HASH_KEY, not both."""
    card_capacity: int = DEFAULT_CARD_CAPACITY
    """Cards tracked in state (power of two); least recently seen are evicted beyond it."""
    entity_capacity: int = DEFAULT_ENTITY_CAPACITY
    """Merchants, customers, devices and IPs tracked, each (power of two)."""
    reasons_method: str = "path"
    """How a REVIEW or DECLINE answer's model reasons are attributed: "path" (Saabas: each split
    on the transaction's path credits its feature; about a prediction's cost) or "shap" (exact
    TreeSHAP, as LightGBM's pred_contrib; ~0.2 ms a flagged transaction). docs/reasons.md."""
    tls_cert_file: Path | None = None
    """PEM certificate chain of the gRPC port (server certificate first). Set with `tls_key_file`
    (both or neither): the port then serves TLS only. docs/security.md."""
    tls_key_file: Path | None = None
    """PEM private key (unencrypted) of `tls_cert_file`."""
    tls_client_ca_file: Path | None = None
    """PEM CA bundle. Set (with the certificate and key): mutual TLS, every client must present a
    certificate signed by one of these CAs, or the handshake fails."""
    tls_reload_s: float = 5.0
    """Seconds between checks of the TLS files' content (cert-manager renews a Secret in place); a
    renewed certificate that loads is served to new connections without a restart. 0: only on SIGHUP."""
    auth_tokens_file: Path | None = None
    """Bearer tokens, one a line (blank lines and lines starting with # skipped). Set: every call but
    grpc.health.v1.Health/Check needs metadata `authorization: Bearer <token>` (Health/Watch and
    server reflection too: they are streams that would hold call slots), or ends UNAUTHENTICATED.
    Re-read when its content changes (`auth_tokens_reload_s`, SIGHUP)."""
    auth_tokens_reload_s: float = 5.0
    """Seconds between checks of the tokens file's content (a mounted Secret changes it in place);
    a changed file is validated and swapped in, a refused one leaves the old tokens. 0: only on SIGHUP."""
    health_port: int = 0
    """An extra plaintext port serving only grpc.health.v1.Health/Check (kubelet probes send neither
    TLS nor tokens), with the main health service's status; Watch there is UNIMPLEMENTED. 0: none."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR. Logs are JSON lines on stderr."""
    fault_injection: str = ""
    """Test hook: "model-raise" makes every model call raise; "model-slow" adds 200 ms to each;
    "pipeline-stall" holds the pipeline thread for 2 s in the first batch."""

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read `FRAUDSCORE_*` from `env` (default: os.environ), then apply non-None overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("state_url_file") is not None:
            if "state_url" in values:
                raise ValueError(f"{ENV_PREFIX}STATE_URL and {ENV_PREFIX}STATE_URL_FILE are both set: set one")
            values["state_url"] = read_key_file(values["state_url_file"], "STATE_URL_FILE") or None
        if values.get("id_hash_key_file") is not None:
            if "id_hash_key" in values:
                raise ValueError(f"{ENV_PREFIX}ID_HASH_KEY and {ENV_PREFIX}ID_HASH_KEY_FILE are both set: set one "
                                 "(the file, for a mounted Secret)")
            values["id_hash_key"] = read_key_file(values["id_hash_key_file"])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse impossible combinations with a message naming the setting."""
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: {rule} (got {getattr(self, name)!r})")
        need(0 <= self.port <= 65535, "port", "must be 0..65535")
        need(0 <= self.metrics_port <= 65535, "metrics_port", "must be 0..65535")
        need(self.budget_ms > 0, "budget_ms", "must be > 0")
        need(self.rules_reload_s >= 0, "rules_reload_s", "must be ≥ 0 (0: reload only on SIGHUP)")
        need(self.model_reload_s >= 0, "model_reload_s", "must be ≥ 0 (0: reload only on SIGHUP)")
        need(1 <= self.max_batch <= 65536, "max_batch", "must be 1..65536")
        need(self.max_wait_us >= 0, "max_wait_us", "must be ≥ 0")
        need(self.max_queue >= self.max_batch, "max_queue", "must be ≥ max_batch")
        need(1 <= self.max_batch_request <= self.max_queue, "max_batch_request",
             "must be ≥ 1 and ≤ max_queue (a larger ScoreBatch could never be queued)")
        need(self.max_concurrent_rpcs >= 1, "max_concurrent_rpcs", "must be ≥ 1")
        need(self.max_pending_rpcs >= 1, "max_pending_rpcs", "must be ≥ 1")
        need(self.max_clock_skew_s >= 0, "max_clock_skew_s", "must be ≥ 0")
        need(self.shutdown_grace_s >= 0, "shutdown_grace_s", "must be ≥ 0")
        # Fewer would evict records of calls still queued or in the pipeline: their retries
        # would be scored again and count twice.
        need(self.idempotency_max_entries >= self.max_queue + self.max_batch, "idempotency_max_entries",
             "must be ≥ max_queue + max_batch")
        for name in ("card_capacity", "entity_capacity"):
            v = getattr(self, name)
            need(v >= 16 and v & (v - 1) == 0, name, "must be a power of two ≥ 16")
        need(self.reasons_method in ("path", "shap"), "reasons_method", "must be \"path\" or \"shap\"")
        need(self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level", "must be DEBUG, INFO, WARNING or ERROR")
        need(self.fault_injection in ("", "model-raise", "model-slow", "pipeline-stall"), "fault_injection",
             "must be empty, \"model-raise\", \"model-slow\" or \"pipeline-stall\"")
        need(self.shed_mode in ("refuse", "fallback"), "shed_mode", "must be \"refuse\" or \"fallback\"")
        need(self.max_stream_messages >= 1, "max_stream_messages", "must be ≥ 1")
        need(0 <= self.health_port <= 65535, "health_port", "must be 0..65535 (0: no health port)")
        need(self.health_port == 0 or self.health_port != self.port, "health_port",
             "must differ from FRAUDSCORE_PORT (it serves plaintext health only)")
        need(self.tls_reload_s >= 0, "tls_reload_s", "must be ≥ 0 (0: reload only on SIGHUP)")
        need(self.max_connection_age_s == 0 or self.max_connection_age_s >= 1, "max_connection_age_s",
             "must be 0 (connections never aged out) or ≥ 1 second")
        need(self.workers >= 1, "workers", "must be ≥ 1")
        if self.workers > 1 and self.state_url is None:
            raise ValueError(f"{ENV_PREFIX}WORKERS={self.workers} needs {ENV_PREFIX}STATE_URL (a shared store): each "
                             "worker would otherwise keep its own part of every card's history")
        if self.workers > 1 and self.port == 0:
            raise ValueError(f"{ENV_PREFIX}WORKERS={self.workers} needs a fixed {ENV_PREFIX}PORT (the workers share it)")
        need(self.state_ttl_s > 0, "state_ttl_s", "must be > 0")
        need(self.state_timeout_ms > 0, "state_timeout_ms", "must be > 0")
        if self.state_ca_file is not None and not (self.state_url or "").startswith("rediss"):
            raise ValueError(f"{ENV_PREFIX}STATE_CA_FILE is set but {ENV_PREFIX}STATE_URL is not a TLS form "
                             "(rediss://, rediss+cluster://, rediss+sentinel://): a CA verifies a TLS server only")
        if self.state_url is not None and not self.state_url.startswith(STATE_URL_SCHEMES):
            # Not the URL itself in the message: it may hold a password.
            raise ValueError(f"{ENV_PREFIX}STATE_URL: expected one of {', '.join(STATE_URL_SCHEMES)} (redis://[user:"
                             "password@]host:port/db; docs/state-store.md has every form); it starts otherwise")
        need(self.auth_tokens_reload_s >= 0, "auth_tokens_reload_s", "must be ≥ 0 (0: reload only on SIGHUP)")
        if not self.id_hash_key:  # not through need(): its message would quote the key
            raise ValueError(f"{ENV_PREFIX}ID_HASH_KEY is empty: a keyed hash needs a secret; set one of at least "
                             "16 random bytes, or unset it for the published development key")
        try:
            self.id_hash_key.encode()
        except UnicodeEncodeError:  # e.g. raw bytes read as surrogates; the message never quotes the key
            raise ValueError(f"{ENV_PREFIX}ID_HASH_KEY has characters that are not valid text (bytes that are not "
                             "UTF-8); set it to text, e.g. a base64 or hex encoding of the random bytes") from None
        self._validate_tls()

    def _validate_tls(self) -> None:
        """Which TLS files go together; their content is checked at start-up (service/security/auth.py)."""
        cert, key = ENV_PREFIX + "TLS_CERT_FILE", ENV_PREFIX + "TLS_KEY_FILE"
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            have, missing = (cert, key) if self.tls_key_file is None else (key, cert)
            raise ValueError(f"{missing} is missing: {have} is set, and TLS needs both the PEM certificate chain "
                             f"({cert}) and its private key ({key}); set {missing}, or unset both to serve plaintext")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(f"{ENV_PREFIX}TLS_CLIENT_CA_FILE is set but {cert} and {key} are not: mutual TLS "
                             "needs the server's own certificate and key too; set them, or unset "
                             f"{ENV_PREFIX}TLS_CLIENT_CA_FILE")

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new


def read_key_file(path: Path, setting: str = "ID_HASH_KEY_FILE") -> str:
    """The secret held in `path` (the identifier key, or `setting`'s): its UTF-8 text, less one trailing
    newline (as `echo` and Kubernetes Secrets made from literals leave it). Raises ValueError, never
    quoting the content."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{ENV_PREFIX}{setting}: cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{ENV_PREFIX}{setting}: {path} is not UTF-8 text; store it as text, e.g. "
                         "a base64 or hex encoding of the random bytes") from None
    return text.removesuffix("\n").removesuffix("\r")


def _parse(name: str, type_name: str, raw: str) -> Any:
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if "Path" in type_name:
            return Path(raw) if raw else None
        return raw
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: expected {type_name}, got {raw!r}") from None
