#!/usr/bin/env bash
# Makes `uv` available: the one on PATH, else ~/.local/bin/uv, else installs it there with the
# system Python's pip (`pip install --user uv`). On Debian/Ubuntu (PEP 668: "externally managed")
# pip refuses a plain --user install; uv is a self-contained binary that touches no system
# package, so the install is retried with --break-system-packages.
# Prints the uv command to use. Usage: scripts/install-uv.sh
set -euo pipefail
export PATH="$HOME/.local/bin:$PATH"
if command -v uv >/dev/null 2>&1; then
  command -v uv
  exit 0
fi
python="${PYTHON:-python3}"
if ! "$python" -m pip --version >/dev/null 2>&1; then
  echo "uv is missing and $python has no pip: install uv (https://docs.astral.sh/uv/) or pip (apt install python3-pip)" >&2
  exit 1
fi
echo "installing uv into ~/.local/bin (pip --user) ..." >&2
install=("$python" -m pip install --user --quiet --disable-pip-version-check uv)
if ! errors=$("${install[@]}" 2>&1); then
  if [[ "$errors" == *externally-managed* ]]; then
    "${install[@]}" --break-system-packages >&2
  else
    echo "$errors" >&2
    exit 1
  fi
fi
command -v uv
