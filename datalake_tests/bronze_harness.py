"""Runs bronze assets of a test registry against the session's MariaDB, as Dagster runs them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
import yaml

from datalake.definitions import build_definitions
from datalake.settings import Settings, resolve_settings
from datalake_tests.helpers import mariadb_env, run_checks
from datalake_tests.services import MariaDBServer

SCHEMA = "edge_test"


@dataclass
class BronzeHarness:
    server: MariaDBServer
    root: Path
    reader: str
    tables: list[dict[str, Any]] = field(default_factory=list)
    instance: dg.DagsterInstance = field(default_factory=dg.DagsterInstance.ephemeral)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.admin = sa.create_engine(self.server.url(), isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {SCHEMA}")
            conn.exec_driver_sql(f"CREATE DATABASE {SCHEMA} CHARACTER SET utf8mb4")

    @property
    def split(self) -> bool:
        """Whether reads that can be split are (SPLIT_READS: in three streams)."""
        return self.extra_env.get("DATALAKE_EXTRACT_STREAM_MIN_ROWS") == "0"

    def sql(self, statement: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.admin.connect() as conn:
            result = conn.execute(sa.text(statement), params)
            return [tuple(r) for r in result] if result.returns_rows else []

    def register(self, **entry: Any) -> None:
        self.tables.append({"schema": SCHEMA, **entry})

    def settings(self) -> Settings:
        registry = self.root / "registry.yaml"
        registry.write_text(yaml.safe_dump({"tables": self.tables}))
        return resolve_settings(
            mariadb_env(
                self.server,
                self.root,
                DATALAKE_MYSQL_READER=self.reader,
                DATALAKE_REGISTRY=str(registry),
                DATALAKE_PARTITION_START="2024-01-01",
                **self.extra_env,
            )
        )

    def run(
        self,
        table: str,
        *,
        partition: str | None = None,
        config: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        raise_on_error: bool = True,
    ) -> dg.AssetMaterialization | None:
        settings = self.settings()
        defs = build_definitions(settings)
        key = dg.AssetKey(["bronze", table])
        job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={key})
        partition = partition or dt.datetime.now(settings.tz).date().isoformat()
        run_config = {"ops": {f"bronze__{table}": {"config": config}}} if config else None
        result = job.execute_in_process(
            partition_key=partition,
            instance=self.instance,
            run_config=run_config,
            tags=tags,
            raise_on_error=raise_on_error,
        )
        events = result.get_asset_materialization_events()
        return events[0].materialization if events else None

    def check(self, table: str, name: str) -> dg.AssetCheckEvaluation:
        """Runs one asset check of ``bronze/<table>`` and returns its evaluation."""
        key = dg.AssetCheckKey(dg.AssetKey(["bronze", table]), name)
        return run_checks(build_definitions(self.settings()), {key}, self.instance)[(f"bronze/{table}", name)]

    @staticmethod
    def read(materialization: dg.AssetMaterialization | None) -> pa.Table:
        assert materialization is not None, "the run materialized nothing"
        return pq.read_table(str(materialization.metadata["dagster/uri"].value))

    def bronze(self, table: str) -> pa.Table:
        files = sorted((self.root / "lake" / "bronze" / table).rglob("*.parquet"))
        return (
            pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
            if files
            else pa.table({})
        )

    def dispose(self) -> None:
        self.admin.dispose()


def meta(materialization: dg.AssetMaterialization | None, key: str) -> Any:
    assert materialization is not None
    entry = materialization.metadata.get(key)
    return None if entry is None else entry.value
