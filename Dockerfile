# Code-server image of the datalake location. The webserver, daemon and run workers
# (Docker/Kubernetes run launcher) use this same image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    DATALAKE_ENV=prod \
    PATH=/opt/venv/bin:$PATH

# uv from PyPI, pinned: the lock file format is uv's.
RUN pip install --no-cache-dir uv==0.13.8

WORKDIR /opt/dagster/app
# 1) dependencies only: this layer is reused until uv.lock changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
# 2) the code.
COPY README.md ./
COPY datalake ./datalake
RUN uv sync --frozen --no-dev --no-editable

COPY dagster.yaml /opt/dagster/dagster_home/dagster.yaml
RUN useradd --create-home --uid 10001 dagster \
    && mkdir -p /opt/dagster/shared-data \
    && chown -R dagster:dagster /opt/dagster/dagster_home /opt/dagster/shared-data
USER dagster

EXPOSE 4000
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["dagster", "api", "grpc-health-check", "-p", "4000"]
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "datalake.definitions"]
