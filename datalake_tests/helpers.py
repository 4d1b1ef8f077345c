"""Shared test helpers (no fixtures here: those live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dagster as dg

    from datalake_tests.services import MariaDBServer

REPO = Path(__file__).resolve().parents[1]

# Every variable prod requires, with a valid value; tests drop one at a time.
PROD_ENV: dict[str, str] = {
    "DATALAKE_ENV": "prod",
    "DATALAKE_MYSQL_HOST": "v3-replica.internal",
    "DATALAKE_MYSQL_USER": "datalake_ro",
    "DATALAKE_MYSQL_PASSWORD": "s3cret-never-logged",
    "DATALAKE_ROOT_BRONZE": "/opt/dagster/shared-data/bronze",
    "DATALAKE_ROOT_SILVER": "/opt/dagster/shared-data/silver",
    "DATALAKE_ROOT_VANGUARD_WHOLESALE": "/opt/dagster/shared-data/vanguard_wholesale",
    "DATALAKE_PARTITION_START": "2024-01-01",
}


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment without any DATALAKE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATALAKE_")}
    env.update(extra or {})
    return env


def run_cli(
    args: list[str], env: Mapping[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=dict(env), capture_output=True, text=True, timeout=timeout
    )


def lake_env(root: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Settings variables that put every group's storage root under ``root``."""
    env = {
        "DATALAKE_ROOT_BRONZE": str(root / "bronze"),
        "DATALAKE_ROOT_SILVER": str(root / "silver"),
        "DATALAKE_ROOT_VANGUARD_WHOLESALE": str(root / "vanguard_wholesale"),
        "DATALAKE_EXTRACT_LAG_SECONDS": "0",
    }
    env.update(extra or {})
    return env


# Every read the Arrow reader can split is split (the tables of tests are far below the default
# rows per stream): each such window is read in three parallel streams.
SPLIT_READS = {"DATALAKE_EXTRACT_STREAMS": "3", "DATALAKE_EXTRACT_STREAM_MIN_ROWS": "0"}


def mariadb_env(server: MariaDBServer, root: Path, **extra: str) -> dict[str, str]:
    """Settings for a lake under ``root/lake`` that reads the test MariaDB as its read-only user.

    Bronze retries are off: a test that breaks a run wants the failure, not three back-offs.
    """
    return lake_env(
        root / "lake",
        {
            "DATALAKE_MYSQL_HOST": server.host,
            "DATALAKE_MYSQL_PORT": str(server.port),
            "DATALAKE_MYSQL_USER": server.ro_user,
            "DATALAKE_MYSQL_PASSWORD": server.ro_password,
            "DATALAKE_BRONZE_MAX_RETRIES": "0",
            **extra,
        },
    )


def check_evaluations(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    """The asset check evaluations of a run, by (asset key, check name)."""
    return {
        (
            e.asset_check_evaluation_data.asset_key.to_user_string(),
            e.asset_check_evaluation_data.check_name,
        ): e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def run_checks(
    defs: dg.Definitions,
    keys: set[dg.AssetCheckKey],
    instance: dg.DagsterInstance,
    partition: str | None = None,
) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    """Runs just these asset checks, as the UI's "execute checks" does."""
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection=set(), asset_check_selection=keys
    )
    return check_evaluations(
        job.execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)
    )
