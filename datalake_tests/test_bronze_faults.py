"""Crashes, lost connections and secrets: no committed data lost, nothing partial visible."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
import sqlalchemy as sa

from datalake.assets.bronze import build_bronze_asset
from datalake.definitions import build_definitions, build_resources
from datalake.io_managers import BronzeIOManager
from datalake.settings import BRONZE, resolve_settings
from datalake.specs import load_registry
from datalake.watermark import WATERMARK_KEY
from datalake_tests.helpers import SPLIT_READS, clean_environ, mariadb_env, run_cli
from datalake_tests.services import MariaDBServer

pytestmark = pytest.mark.mariadb


def _source_cdrs(engine: sa.Engine) -> pl.DataFrame:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT cdr_id, cost, bytes_used, started_at FROM v3_billing.billing_cdr ORDER BY cdr_id"
        ).all()
    return pl.DataFrame(
        [(int(r[0]), str(r[1]), int(r[2]), r[3].replace(tzinfo=dt.UTC)) for r in rows],
        schema=["cdr_id", "cost", "bytes_used", "started_at"],
        orient="row",
    )


def _bronze_cdrs(root: Path) -> pl.DataFrame:
    files = sorted((root / "lake" / "bronze" / "billing_cdr").rglob("*.parquet"))
    frame = pl.read_parquet(files)
    deduped = frame.unique(subset=["cdr_id"], keep="last").sort("cdr_id")
    return deduped.select(
        pl.col("cdr_id").cast(pl.Int64),
        pl.col("cost").cast(pl.String),
        pl.col("bytes_used").cast(pl.Int64),
        pl.col("started_at"),
    )


# Each reader; ``auto-split``: the Arrow reader with the window read in three parallel streams.
READERS = ["auto", "auto-split", "rows"]


def _reader_env(reader: str) -> dict[str, str]:
    return {"DATALAKE_MYSQL_READER": reader.removesuffix("-split")} | (
        SPLIT_READS if reader.endswith("-split") else {}
    )


@pytest.mark.parametrize("reader", READERS)
def test_sigkill_after_the_write_rereads_the_window(
    v3_mariadb: Any, mariadb_server: MariaDBServer, tmp_path: Path, reader: str
) -> None:
    from datalake.demo.generator import mutate

    source = v3_mariadb(cdr_rows=2_000)
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = clean_environ(mariadb_env(mariadb_server, tmp_path, **_reader_env(reader)))
    env["DAGSTER_HOME"] = str(home)
    today = dt.datetime.now(dt.UTC).date().isoformat()

    crashed = run_cli(["-m", "datalake_tests.fault_runner", "kill-after-write", "billing_cdr", today], env)
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    files = list((tmp_path / "lake" / "bronze" / "billing_cdr").rglob("*.parquet"))
    assert len(files) == 1 and pl.read_parquet(files[0]).height == 2_000  # the file is complete ...
    with dg.DagsterInstance.from_config(str(home)) as instance:
        key = dg.AssetKey(["bronze", "billing_cdr"])
        assert instance.get_latest_materialization_event(key) is None  # ... but nothing was committed

        settings = resolve_settings(mariadb_env(mariadb_server, tmp_path, **_reader_env(reader)))
        defs = build_definitions(settings)
        job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={key})
        import os

        os.environ["DATALAKE_MYSQL_PASSWORD"] = mariadb_server.ro_password
        rerun = job.execute_in_process(partition_key=today, instance=instance)
        (event,) = rerun.get_asset_materialization_events()
        # The next run reads the same window again (at-least-once) and commits it.
        assert event.materialization.metadata["datalake/window_lo"].value == ""
        assert event.materialization.metadata["dagster/row_count"].value == 2_000
        assert WATERMARK_KEY in event.materialization.metadata
        streams = event.materialization.metadata["datalake/streams"].value
        assert streams == (3 if reader.endswith("-split") else 1)

        mutate(source, seed=3, round=1)
        after = job.execute_in_process(partition_key=today, instance=instance)
        (event,) = after.get_asset_materialization_events()
        assert 0 < event.materialization.metadata["dagster/row_count"].value < 2_000  # type: ignore[operator]

    assert _bronze_cdrs(tmp_path).equals(_source_cdrs(source))


class _KillSourceMidStream(BronzeIOManager):
    """Kills the extraction's MySQL connection while its SELECT is streaming rows.

    A watcher polls the processlist from the moment the IO manager starts consuming and kills
    the source user's running query on billing_cdr — whichever reader sends it.
    """

    admin_url: str
    source_user: str

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        killed = threading.Event()

        def watch() -> None:
            engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
            deadline = time.monotonic() + 30
            with engine.connect() as conn:
                while not killed.is_set() and time.monotonic() < deadline:
                    ids = (
                        conn.exec_driver_sql(
                            "SELECT id FROM information_schema.processlist WHERE user = %s "
                            "AND command IN ('Query', 'Execute') AND info LIKE %s",
                            (self.source_user, "%billing_cdr%"),
                        )
                        .scalars()
                        .all()
                    )
                    for connection_id in ids:
                        conn.exec_driver_sql(f"KILL CONNECTION {int(connection_id)}")
                        killed.set()
                    time.sleep(0.002)
            engine.dispose()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            super().handle_output(context, obj)
        finally:
            killed.set()
            watcher.join()


@pytest.mark.parametrize("reader", READERS)
def test_connection_lost_mid_stream_fails_clearly_and_leaves_nothing(
    v3_mariadb: Any,
    mariadb_server: MariaDBServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reader: str,
) -> None:
    v3_mariadb(cdr_rows=300_000)
    monkeypatch.setenv("DATALAKE_MYSQL_PASSWORD", mariadb_server.ro_password)
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        "tables:\n  - {schema: v3_billing, table: billing_cdr, primary_key: [cdr_id], batch_size: 1000,\n"
        "     cursor: {column: cdr_id, kind: integer}, date_column: created_at}\n"
    )
    settings = resolve_settings(
        mariadb_env(mariadb_server, tmp_path, DATALAKE_REGISTRY=str(registry), **_reader_env(reader))
    )
    resources = build_resources(settings)
    resources["bronze_io_manager"] = _KillSourceMidStream(
        root=settings.root(BRONZE),
        azure=resources.get("azure"),  # type: ignore[arg-type]
        admin_url=mariadb_server.url(),
        source_user=mariadb_server.ro_user,
    )
    asset = build_bronze_asset(load_registry(settings.registry_path)[0], settings)
    instance = dg.DagsterInstance.ephemeral()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    result = dg.materialize(
        [asset], resources=resources, instance=instance, partition_key=today, raise_on_error=False
    )
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    text = str(failure.to_string() if failure else "")
    assert "billing_cdr" in text or "Lost connection" in text or "2013" in text, text
    assert mariadb_server.ro_password not in text
    assert instance.get_latest_materialization_event(dg.AssetKey(["bronze", "billing_cdr"])) is None
    lake = tmp_path / "lake" / "bronze"
    assert [p for p in lake.rglob("*") if p.is_file()] == []  # no file, not even an in-progress one


def test_password_never_appears_in_logs_metadata_or_errors(
    v3_mariadb: Any, mariadb_server: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v3_mariadb(cdr_rows=500)
    secret = mariadb_server.ro_password
    monkeypatch.setenv("DATALAKE_MYSQL_PASSWORD", secret)
    settings = resolve_settings(mariadb_env(mariadb_server, tmp_path))
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    job = defs.resolve_job_def("bronze_job")
    result = job.execute_in_process(partition_key=today, instance=instance)
    logs = instance.all_logs(result.run_id)
    assert len(logs) > 20
    assert all(secret not in str(entry) for entry in logs)

    monkeypatch.setenv("DATALAKE_MYSQL_PASSWORD", "wrong-" + secret)
    failed = (
        build_definitions(settings)
        .resolve_job_def("bronze_job")
        .execute_in_process(partition_key=today, instance=instance, raise_on_error=False)
    )
    assert not failed.success
    failure_text = "\n".join(str(e) for e in instance.all_logs(failed.run_id))
    assert "Access denied" in failure_text
    assert secret not in failure_text
