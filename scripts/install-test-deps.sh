#!/usr/bin/env bash
# Installs the programs the test suite starts as throwaway services (MariaDB,
# PostgreSQL, Azurite). Idempotent: anything already present is skipped, so CI
# can call it on every run. Runs as root on Debian 12.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive

apt_missing=()
for pkg in mariadb-server postgresql; do
    # dpkg -s also succeeds for removed-but-not-purged packages; check the state.
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        echo "present: $pkg (apt)"
    else
        apt_missing+=("$pkg")
    fi
done

if ((${#apt_missing[@]} > 0)); then
    # Only refresh the package lists when something actually has to be installed:
    # `apt-get update` is the slowest part of a no-op run.
    apt-get update -qq
    # The postinst scripts may start the system services; the tests never use
    # them (each test session starts its own instances on free ports).
    apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
    for pkg in "${apt_missing[@]}"; do
        echo "installed: $pkg (apt)"
    done
fi

azurite_bin=.tools/azurite/node_modules/.bin/azurite-blob
if [[ -x "$azurite_bin" ]]; then
    echo "present: azurite ($azurite_bin)"
else
    if ! command -v npm >/dev/null 2>&1; then
        if ((${#apt_missing[@]} == 0)); then
            apt-get update -qq
        fi
        apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
        echo "installed: nodejs npm (apt)"
    fi
    mkdir -p .tools/azurite
    npm install --no-audit --no-fund --silent --prefix .tools/azurite azurite@3 >/dev/null
    echo "installed: azurite $(node -p "require('./.tools/azurite/node_modules/azurite/package.json').version") ($azurite_bin)"
fi

# Headless Chromium for the UI smoke test (datalake_tests/test_ui_backfill.py), which runs
# /usr/bin/chromium --headless --screenshot against the `dagster dev` it starts.
if dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q '^install ok installed$'; then
    echo "present: chromium (apt)"
else
    if ((${#apt_missing[@]} == 0)); then
        apt-get update -qq  # not refreshed above
    fi
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
    echo "installed: chromium $(dpkg-query -W -f='${Version}' chromium) (apt)"
fi
