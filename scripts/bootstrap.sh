#!/usr/bin/env bash
# Installs uv when it is missing and syncs the locked Python environment (.venv).
# Usage: scripts/bootstrap.sh [extra `uv sync` args, e.g. --group bench]
set -euo pipefail
cd "$(dirname "$0")/.."
uv="$(scripts/install-uv.sh)"
# --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (as on CI machines) every process would
# otherwise recompile dagster on import (~7 s per process).
"$uv" sync --frozen --compile-bytecode "$@"
