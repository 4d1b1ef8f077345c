#!/usr/bin/env bash
# Installs uv when it is missing and syncs the locked Python environment (.venv).
# Usage: scripts/bootstrap.sh [extra `uv sync` args, e.g. --group bench]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null 2>&1; then
  echo "installing uv (pip) ..."
  python3 -m pip install --quiet --disable-pip-version-check uv
fi
uv sync --frozen "$@"
