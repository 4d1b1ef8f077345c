# syntax=docker/dockerfile:1
# Code-server image of the datalake location (deploy/README.md: build, run, upgrade).
# Runs launched by the Docker or Kubernetes run launcher use this same image; the webserver and
# the daemon can too (with their own entrypoint, see deploy/README.md).
# Checked by datalake_tests/test_dockerfile.py (hadolint + structure) and test_deploy.py (the
# ENTRYPOINT + CMD below, run as they are written).

# ---- build: the locked environment in /opt/venv ------------------------------------------
FROM python:3.11-slim-bookworm AS build

# uv from PyPI, pinned to the version that wrote uv.lock.
RUN pip install --no-cache-dir uv==0.13.8

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv

WORKDIR /opt/dagster/app
# 1) Dependencies only: this layer is rebuilt only when pyproject.toml or uv.lock change, not on
#    every code change. The cache mount keeps downloaded wheels between builds (BuildKit).
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project
# 2) The code, installed as a regular (non-editable) package so the runtime stage needs only the
#    venv. README.md is the package's readme (pyproject), so the build needs it.
COPY README.md ./
COPY datalake ./datalake
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# ---- runtime: no uv, no pip cache, no source tree, no secrets ------------------------------
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    DATALAKE_ENV=prod

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and NFS permissions are stable.
RUN groupadd --gid 10001 dagster \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 dagster \
    && mkdir -p /opt/dagster/dagster_home /opt/dagster/shared-data \
    && chown -R 10001:10001 /opt/dagster/dagster_home /opt/dagster/shared-data

COPY --from=build /opt/venv /opt/venv
# The production instance: PostgreSQL from DAGSTER_PG_* (env: references only; no values here).
# Owned by root and read-only to the process, which writes step logs under DAGSTER_HOME (so it
# could still replace the file: mount it read-only where that matters).
COPY dagster.yaml /opt/dagster/dagster_home/dagster.yaml

WORKDIR /opt/dagster/app
USER 10001:10001

EXPOSE 4000
# The gRPC health service of the code server (the Kubernetes probe can run the same command).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["dagster", "api", "grpc-health-check", "-p", "4000"]

# A code server whose definitions fail to load keeps running and serves the error (healthy, but
# with no assets). The entrypoint resolves the settings, loads the table registry and requires the
# variables the instance's dagster.yaml reads (DAGSTER_PG_*) first: a container with a missing or
# invalid one exits non-zero with one message naming each (never a secret's value), then execs the
# command unchanged (same PID, signals reach Dagster directly).
ENTRYPOINT ["python", "-m", "datalake.preflight"]
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "datalake.definitions"]
