"""Snapshot of the asset graph: a registry or factory change shows up as a readable diff.

Regenerate after an intended change with ``UPDATE_SNAPSHOTS=1 uv run pytest datalake_tests/test_asset_graph.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from datalake.definitions import build_definitions
from datalake.settings import DEFAULT_REGISTRY, resolve_settings

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def _partitions(defn: dg.PartitionsDefinition | None) -> Any:
    if defn is None:
        return None
    if isinstance(defn, dg.TimeWindowPartitionsDefinition):
        return {
            "type": type(defn).__name__,
            "start": defn.start.isoformat(),
            "timezone": defn.timezone,
            "cron": defn.cron_schedule,
            "end_offset": defn.end_offset,
        }
    return {"type": type(defn).__name__}


def graph() -> dict[str, Any]:
    defs = build_definitions(resolve_settings({}))
    asset_graph = defs.resolve_asset_graph()
    assets: dict[str, Any] = {}
    for key in sorted(asset_graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = asset_graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "partitions": _partitions(node.partitions_def),
            "backfill_policy": str(node.backfill_policy) if node.backfill_policy else None,
            "pools": sorted(node.pools or []),
            "kinds": sorted(node.kinds),
        }
    jobs = {
        job.name: sorted(k.to_user_string() for k in job.asset_layer.executable_asset_keys)
        for job in defs.resolve_all_job_defs()
        if not job.name.startswith("__")
    }
    return {"assets": assets, "jobs": jobs}


def test_asset_graph_matches_snapshot() -> None:
    current = graph()
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert SNAPSHOT.exists(), f"no snapshot at {SNAPSHOT}: run with UPDATE_SNAPSHOTS=1 once and commit it"
    assert current == json.loads(SNAPSHOT.read_text())


def test_every_step_that_queries_the_source_takes_a_pool_slot() -> None:
    """Assets and checks alike: MySQL load is bounded by the pool whatever runs."""
    defs = build_definitions(resolve_settings({"DATALAKE_V3_POOL": "v3_custom"}))
    for job in (defs.resolve_job_def("bronze_job"), defs.resolve_implicit_global_asset_job_def()):
        sourced = {
            op.name: op.pool for op in job.graph.iterate_op_defs() if "v3_source" in op.required_resource_keys
        }
        assert len(sourced) > 30 and any("null_cursor" in name for name in sourced), job.name
        assert {name: pool for name, pool in sourced.items() if pool != "v3_custom"} == {}, job.name


def test_every_bronze_asset_is_daily_partitioned_and_pooled() -> None:
    assets = graph()["assets"]
    bronze = {k: v for k, v in assets.items() if k.startswith("bronze/")}
    assert len(bronze) >= 12
    for key, node in bronze.items():
        assert node["partitions"]["type"] == "DailyPartitionsDefinition", key
        assert node["pools"] == ["v3_mysql"], key
    assert assets["silver/fact_invoice"]["deps"] == [
        "silver/invoice_current",
        "silver/invoice_data_current",
        "silver/invoice_status_current",
    ]
    assert assets["silver/invoice_current"]["deps"] == ["bronze/invoice"]
    # every incremental registry table has a current-state silver table
    assert {k for k in assets if k.endswith("_current")} == {
        f"silver/{k.split('/')[1]}_current"
        for k in bronze
        if k not in ("bronze/plan", "bronze/currency_rate")
    }
    assert assets["silver/billing_cdr"]["backfill_policy"] is not None
    assert assets["revsci/billing_usage_aggregated"]["group"] == "vanguard_wholesale"
    assert assets["revsci/billing_usage_aggregated"]["partitions"]["type"] == "DynamicPartitionsDefinition"


def test_two_assets_that_would_share_files_are_refused_at_load() -> None:
    """Files are named by the last part of the key under the IO manager's root: two assets with
    the same last part and IO manager would overwrite each other (different managers are fine)."""
    from datalake.io_managers import check_storage_names

    def asset(*path: str, io_manager_key: str = "silver_io_manager") -> dg.AssetsDefinition:
        @dg.asset(key=list(path), io_manager_key=io_manager_key)
        def _asset() -> None: ...

        return _asset

    with pytest.raises(
        ValueError, match=r"silver/customers/current and silver/partners/current .* rename one"
    ):
        check_storage_names([asset("silver", "customers", "current"), asset("silver", "partners", "current")])
    check_storage_names(
        [asset("silver", "current"), asset("revsci", "current", io_manager_key="revsci_io_manager")]
    )


def test_a_registry_entry_in_its_own_group_is_still_extracted_by_bronze_job(tmp_path: Path) -> None:
    """`group:` names the asset group shown in the UI; the schedule's job still extracts the table."""
    document = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    for entry in document["tables"]:
        if entry["table"] == "currency_rate":
            entry["group"] = "finance"
        if entry["table"] == "partner":
            entry["group"] = "silver"  # a team's odd choice must not pull bronze into silver_job
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump(document))
    defs = build_definitions(resolve_settings({"DATALAKE_REGISTRY": str(registry)}))

    def keys(job: str) -> set[str]:
        return {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.executable_asset_keys}

    assert {"bronze/currency_rate", "bronze/partner"} <= keys("bronze_job")
    assert defs.resolve_assets_def(dg.AssetKey(["bronze", "currency_rate"])).group_names_by_key == {
        dg.AssetKey(["bronze", "currency_rate"]): "finance"
    }
    assert not {k for k in keys("silver_job") if not k.startswith("silver/")}
