# fraudscore: a multi-stage image. The runtime stage has no compiler, no LightGBM and no
# build tools; it runs as a non-root user and writes nothing outside /var/lib/fraudscore
# (state snapshots and the Numba cache), so it works with a read-only root filesystem as
# long as that one path is a writable volume (a Docker volume, or an emptyDir / PVC).
# Every pip install is constrained by constraints.txt: the versions of the environment the tests
# ran in (tests/deploy/test_constraints.py checks and regenerates it).
# Lint: tests/deploy/test_dockerfile.py (hadolint).

# ---- build: generate the API code, build the wheel, train the default model --------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY protos ./protos
COPY core ./core
COPY service ./service
COPY loadtest ./loadtest
RUN python -m venv /opt/tools \
 && /opt/tools/bin/pip install -c constraints.txt "grpcio-tools>=1.66" "mypy-protobuf>=3.6" \
 && /opt/tools/bin/python protos/generate.py \
 && /opt/tools/bin/pip wheel --no-deps --wheel-dir /wheels .
# The default model: simulated history → features → LightGBM, in a throwaway training venv.
# LightGBM's wheel links the system OpenMP runtime (libgomp1), absent from the slim image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/train \
 && /opt/train/bin/pip install -c constraints.txt "/wheels/$(ls /wheels)[train]" \
 && /opt/train/bin/fraudscore train --out /opt/model

# ---- runtime ---------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
# Numba must be able to write its cache directory even to read it (it checks with a temporary
# file, and a read-only one fails every `cache=True` kernel at import). So the cache compiled
# at build time lives read-only in /opt/fraudscore/numba-cache and is copied at start into
# NUMBA_CACHE_DIR, on the writable state volume (~15 MB, milliseconds).
# The cache is keyed by the build machine's CPU name and features, so it only helps nodes with
# the same CPU model: elsewhere every kernel compiles once at start (`fraudscore warm` from cold:
# ~20 s on 2 cores; the chart's startup probe allows 2 minutes, the HEALTHCHECK start period
# 60 s) and keeps going. NUMBA_CPU_NAME=generic would make the cache portable, but it compiles
# without SIMD (and without the AVX-512 VBMI byte-permute path of core/forest/bitvector.py):
# the default model's forest costs ~12x more per row at batch 1 (docs/deploy.md), so it is not
# set. Build the image on (or for, with NUMBA_CPU_NAME/NUMBA_CPU_FEATURES) the nodes' CPU model.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/var/lib/fraudscore/numba-cache \
    FRAUDSCORE_HOST=0.0.0.0 \
    FRAUDSCORE_HEALTH_PORT=50052 \
    FRAUDSCORE_METRICS_HOST=0.0.0.0 \
    FRAUDSCORE_MODEL_DIR=/opt/fraudscore/model \
    FRAUDSCORE_STATE_DIR=/var/lib/fraudscore
COPY --from=build /wheels /wheels
COPY constraints.txt /opt/fraudscore/constraints.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c /opt/fraudscore/constraints.txt "/wheels/$(ls /wheels)" \
 && rm -rf /wheels
COPY --from=build /opt/model /opt/fraudscore/model
# Compile every Numba kernel now, so a new pod serves within seconds and never needs to write
# next to the code.
RUN NUMBA_CACHE_DIR=/opt/fraudscore/numba-cache /opt/venv/bin/fraudscore warm \
 && groupadd --system --gid 10001 fraudscore \
 && useradd --system --uid 10001 --gid fraudscore --no-create-home fraudscore \
 && install -d -o fraudscore -g fraudscore /var/lib/fraudscore
USER 10001:10001
EXPOSE 50051 50052 9464
VOLUME ["/var/lib/fraudscore"]
# The gRPC health service on FRAUDSCORE_HEALTH_PORT (50052 by default: plaintext, health only,
# so it works with TLS or tokens on the main port; FRAUDSCORE_PORT must then not be 50052).
# With FRAUDSCORE_HEALTH_PORT=0 it probes FRAUDSCORE_PORT in plaintext, which cannot work with
# TLS on: `fraudscore health` then says so and exits 2. Start period: a node whose CPU differs
# from the build machine's compiles the kernels first (comment above).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/opt/venv/bin/fraudscore", "health"]
# Refresh the writable Numba cache from the image's, then become `fraudscore` (PID 1 via exec).
ENTRYPOINT ["/bin/sh", "-c", "mkdir -p \"$NUMBA_CACHE_DIR\" && cp -R /opt/fraudscore/numba-cache/. \"$NUMBA_CACHE_DIR\"/ || echo 'fraudscore: NUMBA_CACHE_DIR is not writable; kernels will not load' >&2; exec /opt/venv/bin/fraudscore \"$@\"", "fraudscore"]
CMD ["serve"]
