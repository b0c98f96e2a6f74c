# fraudscore: a multi-stage image. The runtime stage has no compiler, no LightGBM and no
# build tools; it runs as a non-root user and writes nothing outside /var/lib/fraudscore
# (state snapshots and the Numba cache), so it works with a read-only root filesystem as
# long as that one path is a writable volume (a Docker volume, or an emptyDir / PVC).
# Lint: tests/deploy/test_dockerfile.py (hadolint).

# ---- build: generate the API code, build the wheel, train the default model --------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY core ./core
COPY service ./service
COPY loadtest ./loadtest
RUN python -m venv /opt/tools \
 && /opt/tools/bin/pip install "grpcio-tools>=1.66" "mypy-protobuf>=3.6" \
 && /opt/tools/bin/python protos/generate.py \
 && /opt/tools/bin/pip wheel --no-deps --wheel-dir /wheels .
# The default model: simulated history → features → LightGBM, in a throwaway training venv.
# LightGBM's wheel links the system OpenMP runtime (libgomp1), absent from the slim image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/train \
 && /opt/train/bin/pip install "/wheels/$(ls /wheels)[train]" \
 && /opt/train/bin/fraudscore train --out /opt/model

# ---- runtime ---------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
# Numba must be able to write its cache directory even to read it (it checks with a temporary
# file, and a read-only one fails every `cache=True` kernel at import). So the cache compiled
# at build time lives read-only in /opt/fraudscore/numba-cache and is copied at start into
# NUMBA_CACHE_DIR, on the writable state volume (~15 MB, milliseconds). The cache is keyed by
# CPU model: nodes of another model compile once at start (seconds) and keep going.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/var/lib/fraudscore/numba-cache \
    FRAUDSCORE_HOST=0.0.0.0 \
    FRAUDSCORE_METRICS_HOST=0.0.0.0 \
    FRAUDSCORE_MODEL_DIR=/opt/fraudscore/model \
    FRAUDSCORE_STATE_DIR=/var/lib/fraudscore
COPY --from=build /wheels /wheels
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install "/wheels/$(ls /wheels)" \
 && rm -rf /wheels
COPY --from=build /opt/model /opt/fraudscore/model
# Compile every Numba kernel now, so a new pod serves within seconds and never needs to write
# next to the code.
RUN NUMBA_CACHE_DIR=/opt/fraudscore/numba-cache /opt/venv/bin/fraudscore warm \
 && groupadd --system --gid 10001 fraudscore \
 && useradd --system --uid 10001 --gid fraudscore --no-create-home fraudscore \
 && install -d -o fraudscore -g fraudscore /var/lib/fraudscore
USER 10001:10001
EXPOSE 50051 9464
VOLUME ["/var/lib/fraudscore"]
# The gRPC health service: FRAUDSCORE_HEALTH_PORT when set (plaintext, health only: works
# with TLS on the main port), else FRAUDSCORE_PORT.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/opt/venv/bin/fraudscore", "health"]
# Refresh the writable Numba cache from the image's, then become `fraudscore` (PID 1 via exec).
ENTRYPOINT ["/bin/sh", "-c", "mkdir -p \"$NUMBA_CACHE_DIR\" && cp -R /opt/fraudscore/numba-cache/. \"$NUMBA_CACHE_DIR\"/ || echo 'fraudscore: NUMBA_CACHE_DIR is not writable; kernels will not load' >&2; exec /opt/venv/bin/fraudscore \"$@\"", "fraudscore"]
CMD ["serve"]
