#!/usr/bin/env bash
# Installs uv when it is missing and syncs the locked Python environment (.venv).
# Usage: scripts/bootstrap.sh [extra `uv sync` args, e.g. --group bench]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null 2>&1; then
  echo "installing uv (pip) ..."
  python3 -m pip install --quiet --disable-pip-version-check uv
fi
# --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (as on CI machines) every process would
# otherwise recompile dagster on import (~7 s per process).
uv sync --frozen --compile-bytecode "$@"
