"""Bronze run config (the launchpad's operator controls) and registry entries that disagree with the
source: refused before anything is read or committed, naming the field, and never retried."""

from __future__ import annotations

import datetime as dt
from typing import Any

import dagster as dg
import pytest

from datalake.assets.bronze import BronzeRunConfig, RunConfigError, plan_window
from datalake.extract import WindowKind
from datalake.settings import resolve_settings
from datalake.specs import TableSpec
from datalake.watermark import WATERMARK_COLUMN_KEY, WATERMARK_KEY
from datalake_tests.bronze_harness import SCHEMA, BronzeHarness, meta

TODAY = dt.date(2024, 5, 10)
SPEC = TableSpec.model_validate(
    {"schema": "v3", "table": "events", "primary_key": ["id"], "cursor": {"column": "updated_at"}}
)
ID_SPEC = TableSpec.model_validate(
    {
        "schema": "v3",
        "table": "cdr",
        "primary_key": ["id"],
        "cursor": {"column": "id", "kind": "integer"},
        "date_column": "created_at",
    }
)
SNAPSHOT_SPEC = TableSpec.model_validate(
    {"schema": "v3", "table": "countries", "primary_key": ["code"], "mode": "snapshot"}
)


def _plan(
    config: dict[str, Any], *, spec: TableSpec = SPEC, partition: str = "2024-05-10", backfill: bool = False
) -> Any:
    settings = resolve_settings({"DATALAKE_ENV": "local", "DATALAKE_TIMEZONE": "Europe/Berlin"})
    return plan_window(
        spec,
        BronzeRunConfig(**config),
        partition,
        is_backfill=backfill,
        settings=settings,
        committed=lambda: None,
        today=TODAY,
    )


@pytest.mark.parametrize(
    ("config", "kwargs", "field"),
    [
        # Bounds with a mode that would ignore them (the run would read something else).
        ({"mode": "incremental", "window_start": "2024-05-02T00:00:00"}, {}, "window_start/window_end"),
        ({"mode": "full_refresh", "window_end": "2024-05-02T00:00:00"}, {}, "window_start/window_end"),
        # A watermark for a run that commits none, or reads a day statelessly.
        ({"mode": "window", "set_watermark": "2024-05-02T00:00:00"}, {}, "set_watermark"),
        ({"mode": "full_refresh", "set_watermark": "2024-05-02T00:00:00"}, {}, "set_watermark"),
        ({"set_watermark": "2024-05-02T00:00:00"}, {"partition": "2024-05-02"}, "set_watermark"),
        # Watermark-committing modes inside a backfill (its runs read their days statelessly).
        ({"mode": "full_refresh"}, {"backfill": True}, "mode"),
        ({"mode": "incremental"}, {"backfill": True}, "mode"),
        # Values that are not what the cursor holds, and an empty window.
        ({"mode": "window", "window_start": "yesterday"}, {}, "window_start"),
        ({"mode": "incremental", "set_watermark": "2024-05-01"}, {"spec": ID_SPEC}, "set_watermark"),
        (
            {"mode": "window", "window_start": "2024-05-03T00:00:00", "window_end": "2024-05-02T00:00:00"},
            {},
            "window_end",
        ),
        # A snapshot table is read whole: a window or watermark would be ignored.
        ({"window_start": "2024-05-02T00:00:00"}, {"spec": SNAPSHOT_SPEC}, "window_start"),
        ({"mode": "incremental"}, {"spec": SNAPSHOT_SPEC}, "mode"),
    ],
)
def test_contradictory_run_config_is_refused_naming_the_field(
    config: dict[str, Any], kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(RunConfigError) as raised:
        _plan(config, **kwargs)
    assert str(raised.value).startswith(f"{field}: "), raised.value


def test_bounds_without_an_offset_are_in_the_lake_time_zone_like_the_partitions() -> None:
    """Re-reading "May 2" by hand reads what the backfill of May 2 reads (lake zone Europe/Berlin)."""
    backfill = _plan({}, partition="2024-05-02", backfill=True)
    explicit = _plan({"window_start": "2024-05-02T00:00:00", "window_end": "2024-05-03T00:00:00"})
    assert explicit.kind is WindowKind.EXPLICIT  # bounds given, mode auto: the explicit window
    assert (explicit.lo, explicit.hi) == (backfill.lo, backfill.hi)
    assert explicit.lo == dt.datetime(2024, 5, 1, 22, tzinfo=dt.UTC)
    offset = _plan({"mode": "window", "window_start": "2024-05-02T00:00:00+00:00"})
    assert offset.lo == dt.datetime(2024, 5, 2, tzinfo=dt.UTC)
    watermark = _plan({"set_watermark": "2024-05-02T00:00:00"})
    assert watermark.kind is WindowKind.INCREMENTAL and watermark.lo_from_operator
    assert watermark.lo == dt.datetime(2024, 5, 1, 22, tzinfo=dt.UTC)


# --- through Dagster runs, against MariaDB ------------------------------------------------


@pytest.fixture
def retrying(harness: BronzeHarness) -> BronzeHarness:
    """The harness with bronze's retry policy on (no delay): a refused run must not use it."""
    harness.extra_env.update(DATALAKE_BRONZE_MAX_RETRIES="2", DATALAKE_BRONZE_RETRY_DELAY_SECONDS="0")
    return harness


def _failed_once(h: BronzeHarness, table: str, **run: Any) -> str:
    """Runs the table's asset; asserts it failed in one attempt; returns the failure's message."""
    settings = h.settings()
    from datalake.definitions import build_definitions

    job = build_definitions(settings).resolve_implicit_global_asset_job_def()
    job = job.get_subset(asset_selection={dg.AssetKey(["bronze", table])})
    config = run.pop("config", None)
    result = job.execute_in_process(
        partition_key=run.pop("partition", None) or dt.datetime.now(settings.tz).date().isoformat(),
        instance=h.instance,
        run_config={"ops": {f"bronze__{table}": {"config": config}}} if config else None,
        raise_on_error=False,
        **run,
    )
    assert not result.success
    assert not result.get_asset_materialization_events()
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    error = failure.step_failure_data.error
    assert error is not None
    return error.message


def _events(h: BronzeHarness, **entry: Any) -> None:
    h.sql(
        f"""CREATE TABLE {SCHEMA}.events (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            payload VARCHAR(16) NOT NULL, updated_at DATETIME(6) NULL,
            created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"""
    )
    h.sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('a', '2024-05-01'), ('b', NOW(6))")
    h.register(table="events", primary_key=["id"], **({"cursor": {"column": "updated_at"}} | entry))


def test_a_refused_run_config_fails_at_once_naming_the_field(retrying: BronzeHarness) -> None:
    h = retrying
    _events(h)
    message = _failed_once(h, "events", config={"mode": "window", "window_start": "last tuesday"})
    assert "edge_test.events: run config window_start: 'last tuesday' is not an ISO 8601 timestamp" in message


def test_a_set_watermark_beyond_the_source_is_refused_and_commits_nothing(retrying: BronzeHarness) -> None:
    h = retrying
    _events(h)
    first = h.run("events")
    message = _failed_once(h, "events", config={"set_watermark": "2204-05-01T00:00:00+00:00"})
    assert "set_watermark 2204-05-01 00:00:00 is beyond the source's clock" in message
    # The committed watermark is still the first run's: the next run reads on from it.
    h.sql(f"INSERT INTO {SCHEMA}.events (payload, updated_at) VALUES ('c', NOW(6))")
    nxt = h.run("events")
    assert meta(nxt, "datalake/window_lo") == meta(first, WATERMARK_KEY)
    assert h.read(nxt).column("payload").to_pylist() == ["c"]


def test_an_integer_set_watermark_beyond_the_newest_id_is_refused(retrying: BronzeHarness) -> None:
    h = retrying
    h.sql(
        f"""CREATE TABLE {SCHEMA}.cdr (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"""
    )
    h.sql(f"INSERT INTO {SCHEMA}.cdr VALUES (1, '2024-05-01'), (2, '2024-05-01'), (3, '2024-05-02')")
    h.register(
        table="cdr", primary_key=["id"], cursor={"column": "id", "kind": "integer"}, date_column="created_at"
    )
    message = _failed_once(h, "cdr", config={"set_watermark": "3000"})
    assert "set_watermark 3000 is beyond the newest id + 1 (3)" in message
    # Up to the newest id + 1 (nothing new yet) is a watermark the source can reach.
    assert meta(h.run("cdr", config={"set_watermark": "4"}), "dagster/row_count") == 0
    assert meta(h.run("cdr", config={"set_watermark": "2"}), "dagster/row_count") == 2


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        # kind left at its default (timestamp) on an id: MySQL would compare ids with '2026-…' as 2026.
        (
            {"cursor": {"column": "id"}},
            "cursor.column 'id' is BIGINT, but cursor.kind 'timestamp' needs a DATETIME, TIMESTAMP or DATE column",
        ),
        (
            {"cursor": {"column": "updated_at", "kind": "integer"}, "date_column": "created_at"},
            "cursor.column 'updated_at' is DATETIME, but cursor.kind 'integer' needs an integer column",
        ),
        (
            {"cursor": {"column": "id", "kind": "integer"}, "date_column": "payload"},
            "date_column 'payload' is VARCHAR(16), but date_column needs a DATETIME, TIMESTAMP or DATE column",
        ),
    ],
)
def test_a_cursor_whose_type_contradicts_its_kind_is_refused(
    retrying: BronzeHarness, entry: dict[str, Any], expected: str
) -> None:
    h = retrying
    _events(h, **entry)
    assert f"edge_test.events: {expected}" in _failed_once(h, "events")


def test_a_watermark_of_another_cursor_kind_fails_at_once_until_a_full_refresh(
    retrying: BronzeHarness,
) -> None:
    """The registry's cursor changed from an id to a timestamp: the committed id cannot start a
    timestamp window (it failed on every run, retried, with ``Invalid isoformat string: '3'``)."""
    h = retrying
    _events(h, cursor={"column": "id", "kind": "integer"}, date_column="created_at")
    assert meta(h.run("events"), WATERMARK_KEY) == "3"
    h.tables[-1] = {**h.tables[-1], "cursor": {"column": "updated_at", "kind": "timestamp"}}
    h.tables[-1].pop("date_column")
    message = _failed_once(h, "events")
    assert "edge_test.events: the committed watermark '3' is not a value of a timestamp cursor" in message
    assert "mode: full_refresh" in message
    full = h.run("events", config={"mode": "full_refresh"})
    assert meta(full, "dagster/row_count") == 2
    assert meta(h.run("events"), "datalake/window_lo") == meta(full, WATERMARK_KEY)


def test_a_watermark_of_another_cursor_column_fails_at_once_until_a_full_refresh(
    retrying: BronzeHarness,
) -> None:
    """created_at → updated_at, both timestamps: continuing from created_at's watermark would never
    read an update made to an old row before it (found by a review: silver kept the old value)."""
    h = retrying
    _events(h, cursor={"column": "created_at"})
    first = h.run("events")
    assert meta(first, WATERMARK_COLUMN_KEY) == "created_at"
    # An old row updated: its created_at stays below the watermark, its updated_at does not.
    h.sql(f"UPDATE {SCHEMA}.events SET payload = 'a2', updated_at = NOW(6) WHERE payload = 'a'")
    second = h.run("events")
    assert meta(second, "dagster/row_count") == 0
    h.tables[-1] = {**h.tables[-1], "cursor": {"column": "updated_at"}}
    message = _failed_once(h, "events")
    assert (
        f"edge_test.events: the committed watermark {meta(second, WATERMARK_KEY)} is a value of cursor "
        "column 'created_at', and the registry's cursor is now 'updated_at'"
    ) in message
    assert "mode: full_refresh" in message
    full = h.run("events", config={"mode": "full_refresh"})
    assert meta(full, WATERMARK_COLUMN_KEY) == "updated_at"
    assert meta(full, "dagster/row_count") == 2  # 'a2' among them
    assert meta(h.run("events"), "datalake/window_lo") == meta(full, WATERMARK_KEY)


def test_a_watermark_read_from_the_demo_source_is_not_continued_on_mysql(retrying: BronzeHarness) -> None:
    """The lake of ``make demo`` pointed at MySQL: the demo's watermark (id 20001) would skip every
    MySQL row below it."""
    h = retrying
    _events(h)

    def committed(watermark: str, source: str) -> None:  # as a run reading ``source`` records it
        h.instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=dg.AssetKey(["bronze", "events"]),
                metadata={WATERMARK_KEY: watermark, "datalake/source": source},
            )
        )

    committed("2030-01-01T00:00:00.000000+00:00", "demo sqlite at /x")
    message = _failed_once(h, "events")
    assert (
        "edge_test.events: the committed watermark 2030-01-01T00:00:00.000000+00:00 was read from demo"
        in message
    )
    assert "this run reads mysql://" in message and "make clean-lake" in message
    assert meta(h.run("events", config={"mode": "full_refresh"}), "dagster/row_count") == 2
    # Another MySQL server (a failover, a new host name) continues: the same kind of source.
    committed("2024-01-01T00:00:00.000000+00:00", "mysql://ro@other:3306 (tls preferred)")
    assert meta(h.run("events"), "dagster/row_count") == 2
