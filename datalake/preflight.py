"""Container entrypoint: refuse to start without valid settings, then become the command.

    ENTRYPOINT ["python", "-m", "datalake.preflight"]   CMD ["dagster", "code-server", ...]

`dagster code-server start` keeps serving (and passes its health check) when the definitions
fail to load, so a missing production variable would otherwise go unnoticed until a run. This
resolves the settings first and exits non-zero with one message naming every missing or invalid
variable (names only, never values); otherwise it execs the command in place (same PID, so
signals reach Dagster directly).
"""

from __future__ import annotations

import os
import sys

from datalake.settings import SettingsError, resolve_settings


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("datalake.preflight: no command to run")
    try:
        resolve_settings()
    except SettingsError as exc:
        sys.exit(f"datalake: refusing to start: {exc}")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
