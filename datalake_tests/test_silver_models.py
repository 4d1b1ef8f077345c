"""Conformed silver models on hand-built bronze files: what "today" means for them."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from datalake.assets.bronze import daily_partitions
from datalake.assets.silver import build_silver_assets
from datalake.definitions import build_resources
from datalake.extract import LINEAGE_FIELDS
from datalake.lake import bronze_file
from datalake.settings import resolve_settings
from datalake.specs import load_registry
from datalake_tests.helpers import lake_env

TS = pa.timestamp("us", tz="UTC")
STAMP = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)


def _bronze(
    root: Path, table: str, fields: list[tuple[str, pa.DataType]], rows: list[dict[str, object]]
) -> None:
    schema = pa.schema([*fields, ("updated_at", TS), *LINEAGE_FIELDS])
    n = len(rows)
    lineage = {"_datalake_run_id": ["r1"] * n, "_datalake_extracted_at": [STAMP] * n,
               "_datalake_row_seq": list(range(n)), "_datalake_deleted": [False] * n}  # fmt: skip
    columns = {
        f.name: [r.get(f.name, STAMP if f.name == "updated_at" else None) for r in rows] for f in schema
    }
    path = root / "bronze" / bronze_file(table, "2025-03-01", "r1")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({**columns, **lineage}, schema=schema), path)


def test_current_partner_mapping_follows_the_lakes_today(tmp_path: Path) -> None:
    """A dealer moves to a new partner on the lake's today, which is not the process's today."""
    process_today = duckdb.execute("SELECT current_date").fetchall()[0][0]
    # A zone whose date differs from the process's right now (one of them always does).
    zone = next(
        z
        for z in ("Pacific/Kiritimati", "Etc/GMT+12")
        if dt.datetime.now(ZoneInfo(z)).date() != process_today
    )
    today = dt.datetime.now(ZoneInfo(zone)).date()
    settings = resolve_settings(
        lake_env(tmp_path / "lake", {"DATALAKE_TIMEZONE": zone, "DATALAKE_PARTITION_START": "2025-03-01"})
    )
    root = tmp_path / "lake"
    i64, text = pa.int64(), pa.string()
    _bronze(root, "partner", [("partner_id", i64), ("name", text), ("is_wholesale", pa.bool_())],
            [{"partner_id": 1, "name": "OLD", "is_wholesale": True},
             {"partner_id": 2, "name": "NEW", "is_wholesale": True}])  # fmt: skip
    _bronze(root, "dealer", [("dealer_id", i64), ("name", text), ("region", text)],
            [{"dealer_id": 10, "name": "D", "region": "R"}])  # fmt: skip
    _bronze(root, "dealer_partner_mapping",
            [("mapping_id", i64), ("dealer_id", i64), ("partner_id", i64), ("valid_from", pa.date32()),
             ("valid_to", pa.date32()), ("commission_rate", pa.decimal128(7, 4))],
            [{"mapping_id": 1, "dealer_id": 10, "partner_id": 1, "valid_from": dt.date(2025, 1, 1),
              "valid_to": today, "commission_rate": Decimal("0.1")},
             {"mapping_id": 2, "dealer_id": 10, "partner_id": 2, "valid_from": today,
              "commission_rate": Decimal("0.2")}])  # fmt: skip
    _bronze(root, "customer",
            [("customer_id", i64), ("dealer_id", i64), ("first_name", text), ("last_name", text),
             ("company_name", text), ("email", text), ("country_code", text), ("status", text),
             ("is_business", pa.bool_()), ("created_at", TS)],
            [{"customer_id": 1, "dealer_id": 10, "first_name": "a", "last_name": "b", "email": "e",
              "country_code": "NL", "status": "active", "is_business": False, "created_at": STAMP}])  # fmt: skip
    _bronze(root, "customer_address",
            [("address_id", i64), ("customer_id", i64), ("address_type", text), ("city", text),
             ("postal_code", text), ("is_primary", pa.bool_())],
            [{"address_id": 1, "customer_id": 1, "address_type": "billing", "city": "X", "postal_code": "1",
              "is_primary": True}])  # fmt: skip

    specs = load_registry(settings.registry_path)
    bronze = [
        dg.AssetSpec(["bronze", s.asset_name], partitions_def=daily_partitions(settings)) for s in specs
    ]
    resources = {k: v for k, v in build_resources(settings).items() if k not in ("v3_source", "watermarks")}
    tables = ("partner", "dealer", "dealer_partner_mapping", "customer", "customer_address")
    selection = [dg.AssetKey(["silver", f"{t}_current"]) for t in tables] + [
        dg.AssetKey(["silver", "dealer_partner_mapping"]),
        dg.AssetKey(["silver", "dim_customer"]),
    ]
    dg.materialize([*bronze, *build_silver_assets(specs, settings)], resources=resources, selection=selection)

    silver = root / "silver"
    mapping = pq.read_table(silver / "dealer_partner_mapping" / "dealer_partner_mapping.parquet")
    assert dict(zip(mapping["mapping_id"].to_pylist(), mapping["is_current"].to_pylist(), strict=True)) == {
        1: False,
        2: True,
    }
    customer = pq.read_table(silver / "dim_customer" / "dim_customer.parquet").to_pylist()
    assert [(c["customer_id"], c["partner_id"], c["partner_name"]) for c in customer] == [(1, 2, "NEW")]


def test_a_tombstone_outranks_versions_from_files_without_lineage(tmp_path: Path) -> None:
    """A file written before bronze had lineage columns reads them as NULL: those versions were
    observed before any tombstone (DuckDB would sort the NULLs above every value)."""
    from datalake.assets.silver import current_state
    from datalake.specs import TableSpec

    utc = pa.timestamp("us", "UTC")
    at = dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC)
    pq.write_table(
        pa.table({"id": [1, 2], "updated_at": pa.array([at, at], utc), "name": ["a", "b"]}),
        tmp_path / "old.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "id": [1],
                "updated_at": pa.array([at], utc),
                "name": pa.array([None], pa.string()),
                "_datalake_run_id": ["r2"],
                "_datalake_extracted_at": pa.array([dt.datetime(2024, 6, 1, tzinfo=dt.UTC)], utc),
                "_datalake_row_seq": pa.array([0], pa.int64()),
                "_datalake_deleted": [True],
            }
        ),
        tmp_path / "tombstone.parquet",
    )
    spec = TableSpec.model_validate(
        {"schema": "s", "table": "t", "primary_key": ["id"], "cursor": {"column": "updated_at"}}
    )
    files = [str(tmp_path / "old.parquet"), str(tmp_path / "tombstone.parquet")]
    relation = duckdb.connect().read_parquet(files, union_by_name=True, hive_partitioning=False)
    assert current_state(relation, spec).fetchall() == [(2, at, "b")]


def test_a_usage_day_ranks_only_the_versions_of_its_own_cdrs(tmp_path: Path) -> None:
    """silver/billing_cdr builds a day from every bronze file, but deduplicates only the CDRs with
    a version on that day: DuckDB cannot push the day's filter below the dedup's window, and
    ranking the whole history made every run as slow as the lake is old."""
    import json

    from datalake.lake import DuckDBResource

    class ProfiledDuckDB(DuckDBResource):
        profile: str

        def connect(self) -> duckdb.DuckDBPyConnection:
            con = super().connect()
            con.execute(f"SET enable_profiling = 'json'; SET profiling_output = '{self.profile}'")
            return con

    settings = resolve_settings(lake_env(tmp_path / "lake", {"DATALAKE_PARTITION_START": "2025-03-01"}))
    i64, text, day = pa.int64(), pa.string(), dt.timedelta(days=1)
    first = dt.datetime(2025, 3, 1, 12, tzinfo=dt.UTC)
    cdrs = [{"cdr_id": i, "partner_id": 1, "started_at": first + (i // 100) * day, "cost": Decimal(i)}
            for i in range(300)]  # fmt: skip
    cdrs.append(
        {"cdr_id": 5, "partner_id": 1, "started_at": first + day, "cost": Decimal(5)}
    )  # moved: 1 → 2 March
    _bronze(tmp_path / "lake", "billing_cdr",
            [("cdr_id", i64), ("subscription_id", i64), ("customer_id", i64), ("partner_id", i64),
             ("call_type", text), ("started_at", TS), ("duration_seconds", i64), ("bytes_used", i64),
             ("cost", pa.decimal128(12, 4)), ("origin", text), ("destination", text),
             ("is_roaming", pa.bool_()), ("created_at", TS)], cdrs)  # fmt: skip

    specs = load_registry(settings.registry_path)
    bronze = [
        dg.AssetSpec(["bronze", s.asset_name], partitions_def=daily_partitions(settings)) for s in specs
    ]
    resources = {k: v for k, v in build_resources(settings).items() if k not in ("v3_source", "watermarks")}
    profile = tmp_path / "profile.json"
    resources["duckdb_resource"] = ProfiledDuckDB(memory_limit="1GB", profile=str(profile))
    dg.materialize(
        [*bronze, *build_silver_assets(specs, settings)],
        resources=resources,
        selection=[dg.AssetKey(["silver", "billing_cdr"])],
        partition_key="2025-03-02",
    )
    built = pq.read_table(tmp_path / "lake" / "silver" / "billing_cdr" / "2025-03-02.parquet")
    assert sorted(built["cdr_id"].to_pylist()) == [5, *range(100, 200)]

    def ranked(operators: list[dict[str, object]]) -> list[int]:
        """Rows into each WINDOW operator of the profiled query (the output's, run last)."""
        found: list[int] = []
        for o in operators:
            if o["type"] == "WINDOW":
                found.append(int(o["intermediate_rows"]))  # type: ignore[arg-type]
            found += ranked(o.get("children", []))  # type: ignore[arg-type]
        return found

    windows = ranked(json.loads(profile.read_text())["operator"])
    assert windows and max(windows) == 102  # the day's 100 CDRs, and both versions of the moved one
