"""`fraudscore` command line: serve, warm, health, rules check, simulate, train, replay, evaluate, backtest, bench.

Each `serve` flag is also a `FRAUDSCORE_*` environment variable (flags win). The offline
commands live in service/cli/offline.py; training imports stay inside the commands, so
`serve` never loads training libraries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import FraudscoreError
from service.cli import offline, options


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from service.runtime import logs
    from service.runtime.config import Settings
    from service.runtime.server import serve

    try:
        settings = Settings.load(
            model_dir=args.model, rules_file=args.rules, host=args.host, port=args.port,
            metrics_port=args.metrics_port, state_dir=args.state_dir, state_url=args.state_url, workers=args.workers,
        )
    except ValueError as exc:
        print(f"fraudscore serve: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    if settings.workers > 1 and args.worker is None:
        from service.runtime.workers import supervise

        return supervise(settings, model_dir=args.model, rules_file=args.rules)
    try:
        uvloop.run(serve(settings))
    except FraudscoreError as exc:
        print(f"fraudscore serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _warm(args: argparse.Namespace) -> int:
    """Compile every kernel into Numba's on-disk cache (used at image build time)."""
    from core.encode import KeyHasher
    from core.scoring import Scorer
    from service.runtime.config import Settings
    from service.runtime.reload import load_rules
    from service.runtime.restore import load_model
    from service.serving.warm import warm_up

    settings = Settings.load(model_dir=args.model)
    hasher = KeyHasher(settings.id_hash_key.encode())
    model, _ = load_model(settings.model_dir, hasher)
    warm_up(Scorer(model, load_rules(settings.rules_file, hasher=hasher)), hasher)
    print(f"kernels compiled and cached (model: {model.version if model else 'none'})")
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the local server's health service says SERVING (for container health checks).

    Default port: FRAUDSCORE_HEALTH_PORT when > 0 (plaintext, health only), else FRAUDSCORE_PORT;
    --tls-ca (and --tls-cert/--tls-key for mutual TLS) probe a TLS port. Exit 2 without a check
    when FRAUDSCORE_TLS_CERT_FILE is set, FRAUDSCORE_HEALTH_PORT is 0 and --tls-ca is absent."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.runtime.config import Settings

    port = args.port
    if port is None:
        try:
            settings = Settings.load()
        except ValueError as exc:
            print(f"fraudscore health: {exc}", file=sys.stderr)
            return 2
        # --tls-ca probes the TLS port; the health port is plaintext.
        port = settings.port if args.tls_ca is not None else settings.health_port or settings.port
        if settings.tls_cert_file is not None and not settings.health_port and args.tls_ca is None:
            # The main port serves TLS only: a plaintext check there can never pass.
            print("fraudscore health: FRAUDSCORE_TLS_CERT_FILE is set (the gRPC port serves TLS only) and "
                  "FRAUDSCORE_HEALTH_PORT is 0: set FRAUDSCORE_HEALTH_PORT (a plaintext health-only port; "
                  "the image's default is 50052), or pass --tls-ca CA to probe over TLS", file=sys.stderr)
            return 2
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_cert is not None and args.tls_ca is None):
        print("fraudscore health: --tls-cert and --tls-key go together, and with --tls-ca", file=sys.stderr)
        return 2
    target = f"{args.host}:{port}"
    if args.tls_ca is None:
        channel = grpc.insecure_channel(target)
    else:
        try:
            ca, cert, key = (p.read_bytes() if p is not None else None for p in (args.tls_ca, args.tls_cert, args.tls_key))
        except OSError as exc:
            print(f"fraudscore health: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
        options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert), options=options)
    with channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout).status
        except grpc.RpcError as exc:
            print(f"health: {exc.code().name}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _rules_check(args: argparse.Namespace) -> int:
    """Validate a rules file as the server would load it; summarise it. Exit 2 if refused."""
    from collections import Counter

    from core.rules.file import load_ruleset
    from core.rules.ruleset import Rule

    # Named lists are hashed with the server's key, as the server loads them.
    hasher, _ = options.id_hasher(args, "rules check")
    ruleset = load_ruleset(args.file, hasher=hasher)  # RulesLoadError: main() prints it and exits 2

    def tally(rules: tuple[Rule, ...]) -> str:
        by_kind = Counter(("shadow" if r.shadow else "enforce", r.action.name) for r in rules)
        parts = [f"{mode} {action} {by_kind[mode, action]}" for mode in ("enforce", "shadow")
                 for action in ("APPROVE", "REVIEW", "DECLINE") if by_kind[mode, action]]
        return f"{len(rules)}" + (f" ({', '.join(parts)})" if parts else "")

    print(f"{args.file}: valid, version {ruleset.version}")
    print(f"  rules:          {tally(ruleset.rules.rules)}")
    print(f"  fallback rules: {tally(ruleset.fallback.rules)}; "
          f"default probability {ruleset.fallback_default_probability:g}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from service.bench.compute import PARTS
    from service.bench.compute import main as bench_main

    return bench_main(args.model, [args.part] if args.part else PARTS, long_s=args.long)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fraudscore", description="Low-latency fraud scoring for card authorizations.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server (flags override FRAUDSCORE_* variables)")
    s.add_argument("--model", type=Path, help="model directory (FRAUDSCORE_MODEL_DIR, default models/default)")
    s.add_argument("--rules", type=Path, help="rules file (FRAUDSCORE_RULES_FILE, default: packaged rules)")
    s.add_argument("--host", help="gRPC bind address (FRAUDSCORE_HOST, default 127.0.0.1)")
    s.add_argument("--port", type=int, help="gRPC port (FRAUDSCORE_PORT, default 50051)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port (FRAUDSCORE_METRICS_PORT, default 9464; 0 = off)")
    s.add_argument("--state-dir", type=Path, help="state snapshot folder (FRAUDSCORE_STATE_DIR, default state)")
    s.add_argument("--workers", type=int, help="serving processes on the port (FRAUDSCORE_WORKERS, default 1; "
                                               "more needs a shared state, --state-url)")
    s.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor for each worker it starts
    s.add_argument("--state-url", help="shared entity state, redis://[user:password@]host:port/db or rediss://… "
                                       "(FRAUDSCORE_STATE_URL; default: in this process). Prefer the variable or "
                                       "FRAUDSCORE_STATE_URL_FILE when the URL holds a password: flags show in ps")
    s.set_defaults(run=_serve)

    w = sub.add_parser("warm", help="compile the Numba kernels into the on-disk cache and exit")
    w.add_argument("--model", type=Path, help="model directory to warm with (default: FRAUDSCORE_MODEL_DIR)")
    w.set_defaults(run=_warm)

    h = sub.add_parser("health", help="check a server's gRPC health; exit 0 when SERVING (1: not; 2: cannot "
                                      "check, e.g. TLS on and no FRAUDSCORE_HEALTH_PORT without --tls-ca)")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=int, help="default: FRAUDSCORE_HEALTH_PORT when > 0 (plaintext, health only), "
                                             "else FRAUDSCORE_PORT (default 50051)")
    h.add_argument("--tls-ca", type=Path, help="probe over TLS, trusting this PEM CA bundle")
    h.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS; with --tls-key")
    h.add_argument("--tls-key", type=Path, help="client private key (PEM) for mutual TLS; with --tls-cert")
    h.add_argument("--tls-server-name", help="name to verify the server certificate against, when it does not "
                                             "cover --host")
    h.add_argument("--service", default="", help="service name to check (default: the whole server)")
    h.add_argument("--timeout", type=float, default=2.0, help="seconds")
    h.set_defaults(run=_health)

    rules = sub.add_parser("rules", help="work with rules files").add_subparsers(dest="rules_command", required=True)
    rc = rules.add_parser("check", help="validate a rules file as the server would load it, and summarise it; "
                                        "exit 0 when valid, 2 (with the error on stderr) when refused")
    rc.add_argument("file", type=Path, help="rules file (JSON)")
    options.key_file_arg(rc)
    rc.set_defaults(run=_rules_check)

    offline.add_commands(sub)

    b = sub.add_parser("bench", help="features, forest (against LightGBM), the shared store (against in-process "
                                        "state) and serving (against bare gRPC), as ratios")
    b.add_argument("part", nargs="?", choices=("features", "rules", "forest", "store", "serve"),
                   help="run only this part (default: all)")
    b.add_argument("--model", type=Path, default=Path("models/default"), help="model directory")
    b.add_argument("--long", type=float, default=0.0, metavar="SECONDS",
                   help="serve: also run this long at 80%% of the service's peak and print its p99 per 10 s "
                        "(a flat tail, or drift?); e.g. 300")
    b.set_defaults(run=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except FraudscoreError as exc:
        command = " ".join(c for c in (args.command, getattr(args, "rules_command", None)) if c)
        print(f"fraudscore {command}: {exc}", file=sys.stderr)
        return 2
