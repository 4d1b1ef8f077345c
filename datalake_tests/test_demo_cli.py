"""`make demo`'s command on the embedded (SQLite) demo source, in a fresh process."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from datalake_tests.helpers import REPO, clean_environ, lake_env, mariadb_env, run_cli
from datalake_tests.services import MariaDBServer


@pytest.mark.parametrize("start", ["default", "yesterday"])
def test_demo_command_materializes_every_layer(tmp_path: Path, start: str) -> None:
    """With a recent DATALAKE_PARTITION_START the demo keeps to the partitions that exist (its
    backfill of the day before and the silver range failed on unknown partitions)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    extra = {"DATALAKE_DEMO_DIR": str(tmp_path / "demo_source"), "DATALAKE_DEMO_CDR_ROWS": "2000"}
    if start == "yesterday":
        extra["DATALAKE_PARTITION_START"] = (
            dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
        ).isoformat()
    env = clean_environ(lake_env(tmp_path / "lake", extra))
    env["DAGSTER_HOME"] = str(home)
    done = run_cli(["-m", "datalake.cli", "demo", "--days", "2"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for asset in ("bronze/billing_cdr", "silver/fact_invoice", "revsci/billing_usage_aggregated"):
        assert asset in out

    # The runs are in the persistent instance `make dev` opens afterwards.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        bronze = dg.AssetKey(["bronze", "billing_cdr"])
        partitions = instance.get_materialized_partitions(bronze)
        assert len(partitions) == (3 if start == "default" else 2)  # two (one) backfilled days + today
        assert instance.get_latest_materialization_event(dg.AssetKey(["silver", "fact_invoice"])) is not None

    # Bronze holds every CDR the demo source has (today's first incremental run reads them all).
    files = sorted((tmp_path / "lake" / "bronze" / "billing_cdr").rglob("*.parquet"))
    assert len(files) == len(partitions)
    assert pl.scan_parquet(files).select(pl.col("cdr_id").n_unique()).collect().item() == 2000
    assert (tmp_path / "lake" / "vanguard_wholesale" / "billing_usage_aggregated").is_dir()


@pytest.mark.mariadb
def test_demo_command_against_mysql(v3_mariadb: Any, mariadb_server: MariaDBServer, tmp_path: Path) -> None:
    """With MySQL settings the same command reads that MySQL (its password an EnvVar)."""
    v3_mariadb(cdr_rows=1_000)
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = clean_environ(mariadb_env(mariadb_server, tmp_path))
    env["DAGSTER_HOME"] = str(home)
    done = run_cli(["-m", "datalake.cli", "demo", "--days", "1"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"mysql://{mariadb_server.ro_user}@" in done.stdout
    assert mariadb_server.ro_password not in done.stdout + done.stderr
    files = sorted((tmp_path / "lake" / "bronze" / "billing_cdr").rglob("*.parquet"))
    assert pl.scan_parquet(files).select(pl.col("cdr_id").n_unique()).collect().item() == 1_000
    assert list((tmp_path / "lake" / "vanguard_wholesale" / "billing_usage_aggregated").glob("*.parquet"))


def test_uv_is_installed_for_the_user_where_the_system_python_is_externally_managed(tmp_path: Path) -> None:
    """A fresh Debian/Ubuntu machine: no uv, and a system Python whose pip refuses plain installs
    (PEP 668). make demo / make test start with scripts/install-uv.sh."""
    python = shutil.which("python3", path="/usr/bin")
    assert python is not None or not os.environ.get("CI"), "CI machines have the system python3"
    if python is None:
        pytest.skip("no system python3 in /usr/bin")
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",  # no uv
        "HOME": str(tmp_path),
        "PYTHON": python,
        **{k: v for k, v in os.environ.items() if k.startswith(("PIP_", "SSL_CERT"))},  # the package index
    }
    result = subprocess.run(
        [str(REPO / "scripts" / "install-uv.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    uv = result.stdout.strip().splitlines()[-1]
    assert uv == str(tmp_path / ".local" / "bin" / "uv")
    assert subprocess.run([uv, "--version"], capture_output=True, check=False).returncode == 0
    # Once there, it is found and nothing is installed again.
    again = subprocess.run([str(REPO / "scripts" / "install-uv.sh")], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.strip() == uv and "installing" not in again.stderr
