"""Backfills from the UI, end to end: ``dagster dev`` + the GraphQL API the UI uses + headless Chromium.

One ``dagster dev`` (webserver, daemon, code server) per module, exactly as ``make dev`` runs it
(``-w workspace.yaml`` from the repo root, the local instance config ``deploy/dagster.local.yaml``),
on a free loopback port, with a temporary ``DAGSTER_HOME``, the lake under ``tmp_path`` and the
embedded SQLite demo source (2 000 CDRs; no MariaDB needed). The schedules and the automation
sensor stay stopped. (A developer's ``.env`` at the repo root would override that environment:
see ``_workdir``.)

* ``test_backfill_from_the_ui_materializes_each_partition`` launches a 3-partition backfill of
  ``bronze/billing_cdr`` with the UI's own ``launchPartitionBackfill`` mutation; the daemon
  turns it into runs, the queued-run coordinator starts them. It then checks the lake (one
  Parquet file per ingestion date with exactly the source's rows of that UTC day) and what the
  UI shows (the partition status ranges and each partition's materialization).
* ``test_asset_page_renders_in_headless_chromium`` opens the asset's page (Overview and
  Partitions) in Debian's Chromium and checks it rendered; the screenshots are kept under
  ``test-artifacts/ui/``.
* ``test_dagster_dev_stops_by_process_group`` (last, it stops the module's server) checks that
  SIGTERM to the process group stops every process ``dagster dev`` started.

Under ``CI=true`` a missing Chromium fails; locally it skips. ``dagster dev`` itself is part of
the locked environment, so failing to start it always fails.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from datalake_tests.helpers import REPO, clean_environ, lake_env
from datalake_tests.services import ServiceStartError
from datalake_tests.ui import (
    CHROMIUM_INSTALL_HINT,
    DagsterDev,
    find_chromium,
    png_stats,
    run_chromium,
    session_members,
    start_dagster_dev,
    wait_for,
)

ASSET_PATH = ["bronze", "billing_cdr"]
SOURCE_TABLE = "v3_billing.billing_cdr"
DATE_COLUMN = "created_at"
DEMO_CDR_ROWS = 2_000
ARTIFACTS = REPO / "test-artifacts" / "ui"
BACKFILL_TAG = "dagster/backfill"

# The backfill daemon picks a new backfill up on its next tick (~30 s here), the runs take a few
# seconds each, and the backfill is marked done one more tick later.
RUNS_TIMEOUT_S = 240.0
BACKFILL_TIMEOUT_S = 120.0

# ------------------------------------------------------------------ GraphQL (as the UI sends it)

# The UI's own mutation (LaunchPartitionBackfill in the webapp bundle), asset-based form.
LAUNCH_BACKFILL = """
mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PartitionSetNotFoundError { message }
    ... on PartitionKeysNotFoundError { message }
    ... on UnauthorizedError { message }
    ... on PipelineNotFoundError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message stack }
  }
}
"""

BACKFILL_RUNS = """
query BackfillRuns($runsFilter: RunsFilter!) {
  runsOrError(filter: $runsFilter) {
    __typename
    ... on Runs { results { runId status tags { key value } } }
    ... on PythonError { message }
  }
}
"""

BACKFILL_STATUS = """
query BackfillStatus($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill {
      id
      status
      numPartitions
      partitionNames
      assetSelection { path }
      error { message }
    }
    ... on BackfillNotFoundError { message }
    ... on PythonError { message }
  }
}
"""

ASSET_PARTITIONS = """
query AssetPartitions($assetKey: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode {
      assetPartitionStatuses {
        __typename
        ... on TimePartitionStatuses { ranges { status startKey endKey } }
      }
      assetMaterializations(partitions: $partitions) {
        partition
        runId
        metadataEntries { label ... on IntMetadataEntry { intValue } }
      }
    }
    ... on AssetNotFoundError { message }
  }
}
"""

# What the UI sends when the "Join the Dagster community" dialog is dismissed (stored in the
# instance): without it that dialog covers the page a fresh instance shows on 127.0.0.1.
SET_NUX_SEEN = "mutation SetNuxSeen { setNuxSeen }"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@dataclass
class UiLocation:
    dev: DagsterDev
    base: Path
    lake: Path
    demo_dir: Path


def _workdir(base: Path, repo: Path = REPO) -> Path:
    """Where ``dagster dev`` runs: the repo root, as ``make dev`` runs it, unless the repo has a ``.env``.

    ``dagster dev`` loads ``.env`` from its working directory *over* the environment it was given
    (a copy of ``.env.example`` would point the lake and the demo source at ``tmp/`` in the repo).
    Then it runs from a directory of its own holding the same ``workspace.yaml`` and a symlink to
    the ``datalake`` package (the workspace's ``working_directory: .`` is the process's cwd).
    """
    if not (repo / ".env").exists():
        return repo
    work = base / "workdir"
    work.mkdir(exist_ok=True)
    shutil.copyfile(repo / "workspace.yaml", work / "workspace.yaml")
    link = work / "datalake"
    if not link.is_symlink():
        link.symlink_to(repo / "datalake", target_is_directory=True)
    return work


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiLocation]:
    """``dagster dev`` on a free loopback port for this module; stopped by process group at the end."""
    base = tmp_path_factory.mktemp("ui")
    lake, demo_dir = base / "lake", base / "demo"
    env = clean_environ(
        lake_env(
            lake,
            {
                "DATALAKE_DEMO_DIR": str(demo_dir),
                "DATALAKE_DEMO_CDR_ROWS": str(DEMO_CDR_ROWS),
                # Schedules and the automation sensor stay stopped (the local default, made
                # explicit): the only runs in this instance are the ones the tests launch.
                "DATALAKE_AUTOMATION": "stopped",
            },
        )
    )
    cwd = _workdir(base)
    dev: DagsterDev | None = None
    problem = ""
    try:
        dev = start_dagster_dev(
            env=env,
            dagster_home=base / "dagster_home",
            log_path=base / "dagster-dev.log",
            cwd=cwd,
            workspace=cwd / "workspace.yaml",
        )
    except ServiceStartError as exc:
        # Reported outside the except block, so the report is not cluttered with a chained traceback.
        problem = f"dagster dev could not be started: {exc}"
    if dev is None:
        pytest.fail(problem, pytrace=False)
    try:
        dev.graphql(SET_NUX_SEEN)
        yield UiLocation(dev=dev, base=base, lake=lake, demo_dir=demo_dir)
    finally:
        # Raises (an ERROR in the report) if any process of the session survives SIGKILL.
        dev.stop()


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium. Checked before ``ui`` starts (same scope, earlier argument) so a skip is cheap."""
    found = find_chromium()
    if found is None:
        message = f"chromium not installed; {CHROMIUM_INSTALL_HINT}"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


# ------------------------------------------------------------------ helpers


def _past_dates(n: int) -> list[str]:
    """The ``n`` UTC days before today, oldest first (the demo source covers the 30 days before today)."""
    today = dt.datetime.now(dt.UTC).date()
    return [(today - dt.timedelta(days=d)).isoformat() for d in range(n, 0, -1)]


def _daily_keys(start: str, end: str) -> list[str]:
    day, last = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    keys = []
    while day <= last:
        keys.append(day.isoformat())
        day += dt.timedelta(days=1)
    return keys


def _source_rows_per_day(demo_dir: Path, dates: list[str]) -> dict[str, int]:
    """Rows of the demo source's CDR table whose ``created_at`` (naive UTC) falls in each UTC day."""
    from datalake.demo.schema import metadata, sqlite_engine

    table = metadata.tables[SOURCE_TABLE]
    column = table.c[DATE_COLUMN]
    engine = sqlite_engine(demo_dir)
    try:
        with engine.connect() as conn:
            counts = {}
            for date in dates:
                lo = dt.datetime.fromisoformat(date)
                query = (
                    sa.select(sa.func.count())
                    .select_from(table)
                    .where(column >= lo, column < lo + dt.timedelta(days=1))
                )
                counts[date] = int(conn.execute(query).scalar_one())
            return counts
    finally:
        engine.dispose()


def _run_partitions(run: dict[str, Any]) -> set[str]:
    """Partitions a backfill run covers: one (``dagster/partition``) or a range (single-run backfills)."""
    tags = {t["key"]: t["value"] for t in run["tags"]}
    if "dagster/partition" in tags:
        return {tags["dagster/partition"]}
    start, end = (
        tags.get("dagster/asset_partition_range_start"),
        tags.get("dagster/asset_partition_range_end"),
    )
    return set(_daily_keys(start, end)) if start and end else set()


class RunFailed(AssertionError):
    pass


def _wait_for_runs(dev: DagsterDev, backfill_id: str, dates: list[str]) -> list[dict[str, Any]]:
    """Poll the runs tagged with the backfill until every partition has a successful run."""
    runs_filter = {"tags": [{"key": BACKFILL_TAG, "value": backfill_id}]}

    def done() -> list[dict[str, Any]]:
        result = dev.graphql(BACKFILL_RUNS, {"runsFilter": runs_filter})["runsOrError"]
        assert result["__typename"] == "Runs", result
        runs = result["results"]
        failed = [r for r in runs if r["status"] in ("FAILURE", "CANCELED", "CANCELING")]
        if failed:
            raise RunFailed(f"backfill {backfill_id}: runs did not succeed: {failed}\n{dev.log_tail()}")
        covered = set().union(*(_run_partitions(r) for r in runs)) if runs else set()
        statuses = sorted(r["status"] for r in runs)
        if not runs or any(s != "SUCCESS" for s in statuses) or covered != set(dates):
            raise RuntimeError(f"runs {statuses}, partitions {sorted(covered)}")
        return runs

    return wait_for(done, timeout=RUNS_TIMEOUT_S, interval=2.0, what="backfill runs", fatal=(RunFailed,))


def _wait_for_backfill(dev: DagsterDev, backfill_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any]:
        backfill = dev.graphql(BACKFILL_STATUS, {"backfillId": backfill_id})["partitionBackfillOrError"]
        assert backfill["__typename"] == "PartitionBackfill", backfill
        if backfill["status"] in ("FAILED", "COMPLETED_FAILED", "CANCELED", "CANCELING", "FAILING"):
            raise RunFailed(f"backfill {backfill_id} ended {backfill['status']}: {backfill['error']}")
        if backfill["status"] not in ("COMPLETED", "COMPLETED_SUCCESS"):
            raise RuntimeError(f"backfill status {backfill['status']}")
        return backfill

    return wait_for(
        done, timeout=BACKFILL_TIMEOUT_S, interval=2.0, what="backfill status", fatal=(RunFailed,)
    )


def _as_utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _visible_text(html: str) -> str:
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


# ------------------------------------------------------------------ tests


def test_backfill_from_the_ui_materializes_each_partition(ui: UiLocation) -> None:
    dev = ui.dev
    dates = _past_dates(3)

    launched = dev.graphql(
        LAUNCH_BACKFILL,
        {
            "backfillParams": {
                "assetSelection": [{"path": ASSET_PATH}],
                "partitionNames": dates,
                "title": "test_ui_backfill",
            }
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    runs = _wait_for_runs(dev, backfill_id, dates)
    backfill = _wait_for_backfill(dev, backfill_id)
    assert backfill["partitionNames"] == dates
    assert backfill["assetSelection"] == [{"path": ASSET_PATH}]
    run_ids = {r["runId"] for r in runs}

    # The lake: one Parquet file per ingestion date, with the source's rows of that UTC day.
    expected = _source_rows_per_day(ui.demo_dir, dates)
    assert all(n > 0 for n in expected.values()), f"demo source has an empty day: {expected}"
    table_dir = ui.lake.joinpath(*ASSET_PATH)
    assert sorted(p.name for p in table_dir.iterdir()) == [f"ingestion_date={d}" for d in dates]
    for date in dates:
        partition_dir = table_dir / f"ingestion_date={date}"
        files = sorted(partition_dir.iterdir())
        assert len(files) == 1 and files[0].suffix == ".parquet", files  # no leftover in-progress file
        path = files[0]
        assert path.stat().st_size > 0
        assert any(run_id in path.name for run_id in run_ids), f"{path.name} not written by {run_ids}"
        created = pq.read_table(path, columns=[DATE_COLUMN]).column(DATE_COLUMN)
        assert len(created) == expected[date], (
            f"{date}: {len(created)} rows in {path}, source has {expected[date]}"
        )
        lo = dt.datetime.fromisoformat(date).replace(tzinfo=dt.UTC)
        days = [_as_utc(v) for v in created.to_pylist()]
        first, last = min(days), max(days)
        assert lo <= first and last < lo + dt.timedelta(days=1), f"{date}: rows from {first} to {last}"

    # What the UI shows: exactly those partitions materialized, each by a run of this backfill.
    node = dev.graphql(ASSET_PARTITIONS, {"assetKey": {"path": ASSET_PATH}, "partitions": dates})[
        "assetNodeOrError"
    ]
    assert node["__typename"] == "AssetNode", node
    statuses = node["assetPartitionStatuses"]
    assert statuses["__typename"] == "TimePartitionStatuses", statuses
    by_status: dict[str, set[str]] = {}
    for r in statuses["ranges"]:
        by_status.setdefault(r["status"], set()).update(_daily_keys(r["startKey"], r["endKey"]))
    assert by_status == {"MATERIALIZED": set(dates)}, statuses["ranges"]
    latest: dict[str, dict[str, Any]] = {}
    for event in node["assetMaterializations"]:
        latest.setdefault(event["partition"], event)  # newest first
    assert sorted(latest) == dates
    for date, event in latest.items():
        assert event["runId"] in run_ids
        row_count = {e["label"]: e.get("intValue") for e in event["metadataEntries"]}.get("dagster/row_count")
        assert row_count == expected[date], f"{date}: dagster/row_count {row_count}, source {expected[date]}"


def test_asset_page_renders_in_headless_chromium(chromium: Path, ui: UiLocation) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    asset_url = ui.dev.url("/assets/" + "/".join(ASSET_PATH))

    # Overview: the asset's own page.
    overview_png = ARTIFACTS / "asset_bronze_billing_cdr.png"
    result = run_chromium(
        asset_url,
        user_data_dir=ui.base / "chromium-overview",
        screenshot=overview_png,
        dump_dom=True,
        chromium=chromium,
    )
    (ARTIFACTS / "asset_bronze_billing_cdr.html").write_text(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    assert overview_png.is_file(), result.stderr[-3000:]
    assert overview_png.stat().st_size > 20_000, f"{overview_png}: {overview_png.stat().st_size} bytes"
    stats = png_stats(overview_png)
    assert (stats.width, stats.height) == (1400, 900), stats
    assert stats.distinct_colours >= 16 and stats.dominant_share < 0.98, f"blank-looking screenshot: {stats}"
    text = _visible_text(result.stdout)
    for expected in ("billing_cdr", SOURCE_TABLE, "Partitions", "bronze_job", "datalake"):
        assert expected in text, f"{expected!r} not on the page: {text[:2000]}"
    for error in ("No assets were found", "Unexpected error", "PythonError", "Error loading"):
        assert error not in text, f"{error!r} on the page: {text[:2000]}"

    # Partitions tab: the counts it shows match what the GraphQL API reports right now.
    partitions_png = ARTIFACTS / "asset_bronze_billing_cdr_partitions.png"
    result = run_chromium(
        asset_url + "?view=partitions",
        user_data_dir=ui.base / "chromium-partitions",
        screenshot=partitions_png,
        dump_dom=True,
        chromium=chromium,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert partitions_png.is_file() and partitions_png.stat().st_size > 20_000
    node = ui.dev.graphql(ASSET_PARTITIONS, {"assetKey": {"path": ASSET_PATH}, "partitions": []})[
        "assetNodeOrError"
    ]
    materialized = sum(
        len(_daily_keys(r["startKey"], r["endKey"]))
        for r in node["assetPartitionStatuses"]["ranges"]
        if r["status"] == "MATERIALIZED"
    )
    text = _visible_text(result.stdout)
    shown = re.search(r"Materialized \((\d+)\)", text)
    assert shown is not None, f"no materialized count on the partitions tab: {text[:2000]}"
    assert int(shown.group(1)) == materialized, text[:2000]


def test_dagster_dev_stops_by_process_group(ui: UiLocation) -> None:
    """Stops the module's ``dagster dev``: keep this test last in the module."""
    dev = ui.dev
    commands = [m.cmdline for m in session_members(dev.pid)]
    for part in ("dagster_webserver", "dagster._daemon", "code-server", " dev "):
        assert any(part in c for c in commands), f"no {part!r} process in {commands}"
    report = dev.stop()
    # dagster dev maps SIGTERM onto its SIGINT handler: it must honour it (no SIGKILL needed) ...
    assert report.graceful, f"SIGKILL was needed: {report}"
    # ... and nothing it started (webserver, daemon, code server, run workers) survives it.
    assert not dev.is_running()
    assert [m for m in report.members if m.is_alive()] == []
    assert session_members(dev.pid) == []
