"""Container entrypoint: refuse to start without valid settings, then become the command.

    ENTRYPOINT ["python", "-m", "datalake.preflight"]   CMD ["dagster", "code-server", ...]

`dagster code-server start` keeps serving (and passes its health check) when the definitions
fail to load, so a missing production variable would otherwise go unnoticed until a run. This
resolves the settings, loads the table registry and checks that every variable the instance's
``dagster.yaml`` reads (``{env: DAGSTER_PG_…}``) is set, and exits non-zero with one message naming
every missing or invalid one (the values of secrets are never shown); otherwise it execs the
command in place (same PID, so signals reach Dagster directly).

The image is production: it refuses ``DATALAKE_ENV=local`` (an env file made from .env.example
without changing that line would override the image's ``prod`` and start a half-configured code
location with its schedules stopped) unless ``DATALAKE_ALLOW_LOCAL=1`` asks for it (trying the image
on the demo source).
"""

from __future__ import annotations

import os
import sys

from datalake.settings import Environment, SettingsError, resolve_settings
from datalake.specs import RegistryError, load_registry

ALLOW_LOCAL_VAR = "DATALAKE_ALLOW_LOCAL"


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("datalake.preflight: no command to run")
    try:
        settings = resolve_settings()
    except SettingsError as exc:
        sys.exit(f"datalake: refusing to start: {exc}")
    if settings.environment is not Environment.PROD and os.environ.get(ALLOW_LOCAL_VAR) != "1":
        sys.exit(
            f"datalake: refusing to start: DATALAKE_ENV is {settings.environment.value!r}, and this is the "
            "production entrypoint (an env file made from .env.example must say DATALAKE_ENV=prod); "
            f"set {ALLOW_LOCAL_VAR}=1 to run the image locally on the demo source"
        )
    try:
        load_registry(settings.registry_path)
    except RegistryError as exc:
        sys.exit(f"datalake: refusing to start: {exc}")
    unset = [name for name in instance_variables() if not os.environ.get(name)]
    if unset:
        sys.exit(
            f"datalake: refusing to start: the Dagster instance ($DAGSTER_HOME/dagster.yaml) reads "
            f"{', '.join(unset)}, which {'is' if len(unset) == 1 else 'are'} not set"
        )
    os.execvp(argv[0], argv)


def instance_variables() -> list[str]:
    """The environment variables ``$DAGSTER_HOME/dagster.yaml`` reads (``{env: NAME}``), in order."""
    home = os.environ.get("DAGSTER_HOME")
    path = os.path.join(home, "dagster.yaml") if home else None
    if path is None or not os.path.isfile(path):
        return []
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f)
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if set(node) == {"env"} and isinstance(node["env"], str):
                found.append(node["env"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return list(dict.fromkeys(found))


if __name__ == "__main__":
    main(sys.argv[1:])
