"""One silver tool per process, for bench/wide_bench.py (peak RSS is per process).

    python -m bench.silver_tools TOOL BRONZE_ROOT TABLE OUT_DIR

The current state of a bronze table of documents (latest version per ``document_id``, lineage
columns dropped) from its bronze files (what this project's extraction wrote) to one Parquet file. Prints one JSON line: {"rows": n,
"seconds": wall of the step, "row_groups": n}; imports are excluded, as a code server has them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from datalake.extract import EXTRACTED_AT_COLUMN, LINEAGE_COLUMNS, ROW_SEQ_COLUMN

KEY, CURSOR = "document_id", "created_at"
ORDER = [CURSOR, EXTRACTED_AT_COLUMN, ROW_SEQ_COLUMN]
Step = Callable[[], Path]
Tool = Callable[[Path, str, Path], Step]


def project(bronze: Path, table: str, out: Path) -> Step:
    """The registry table's silver current-state asset as a user runs it: a Dagster materialization
    with the code location's path input manager, Parquet IO manager and DuckDB resource."""
    import dagster as dg

    from datalake.assets.silver import build_current_state_asset
    from datalake.io_managers import DuckDBPathInputManager, ParquetIOManager
    from datalake.lake import DuckDBResource
    from datalake.specs import TableSpec

    spec = TableSpec.model_validate(
        {
            "schema": "v3_docs",
            "table": table,
            "primary_key": [KEY],
            "cursor": {"column": CURSOR, "kind": "timestamp"},
        }
    )
    roots = {"bronze_io_manager": str(bronze), "silver_io_manager": str(out)}
    resources = {
        "duckdb_resource": DuckDBResource(),
        "duckdb_path_input_manager": DuckDBPathInputManager(roots=roots),
        "silver_io_manager": ParquetIOManager(root=str(out)),
    }
    assets = [dg.AssetSpec(["bronze", table]), build_current_state_asset(spec)]

    def run() -> Path:
        dg.materialize(assets, resources=resources, selection=[dg.AssetKey(["silver", f"{table}_current"])])
        return out / f"{table}_current" / f"{table}_current.parquet"

    return run


def _files(bronze: Path, table: str) -> list[str]:
    return sorted(str(p) for p in (bronze / table).rglob("*.parquet"))


def polars_lazy(bronze: Path, table: str, out: Path) -> Step:
    """polars `scan_parquet` → latest version per key → `sink_parquet` (streaming engine)."""
    import polars as pl

    def run() -> Path:
        target = out / f"{table}_current.parquet"
        out.mkdir(parents=True, exist_ok=True)
        frame = pl.scan_parquet(_files(bronze, table))
        keep = [c for c in frame.collect_schema().names() if c not in LINEAGE_COLUMNS]
        latest = frame.sort(ORDER).unique(subset=[KEY], keep="last", maintain_order=False)
        latest.select(keep).sink_parquet(target, compression="zstd")
        return target

    return run


def polars_eager(bronze: Path, table: str, out: Path) -> Step:
    """What a DataFrame-loading IO manager (dagster-polars' default) hands the asset: the files read
    eagerly, deduplicated in memory, written with `write_parquet`."""
    import polars as pl

    def run() -> Path:
        target = out / f"{table}_current.parquet"
        out.mkdir(parents=True, exist_ok=True)
        frame = pl.read_parquet(_files(bronze, table))
        keep = [c for c in frame.columns if c not in LINEAGE_COLUMNS]
        latest = frame.sort(ORDER).unique(subset=[KEY], keep="last", maintain_order=False)
        latest.select(keep).write_parquet(target, compression="zstd")
        return target

    return run


TOOLS: dict[str, Tool] = {"project": project, "polars_lazy": polars_lazy, "polars_eager": polars_eager}


if __name__ == "__main__":
    name, bronze_root, table, out_root = sys.argv[1:5]
    step = TOOLS[name](Path(bronze_root), table, Path(out_root))
    started = time.perf_counter()
    written = step()
    seconds = time.perf_counter() - started
    footer = pq.read_metadata(written)
    print(json.dumps({"rows": footer.num_rows, "seconds": seconds, "row_groups": footer.num_row_groups}))
