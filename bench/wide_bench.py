"""Wide-row benchmark: a table of ~512 KB documents, extracted by every tool at two table sizes,
then its silver current state built from the bronze files this project wrote.

    make bench                                 # everything
    uv run python -m bench wide                # this one (400 and 1600 documents: 210 and 840 MB)
    BENCH_WIDE_ROWS=400 uv run python -m bench wide

Row counts do not bound memory when rows are wide. Each tool runs with the settings of the
extraction benchmark (batches of 100 000 rows; this project: the registry's defaults, so row groups
and fetches also end at DATALAKE_BATCH_BYTES, 32 MiB, and an eighth of it) in its own process;
the table shows each one's peak RSS and time at both sizes. A tool whose memory follows the table
holds the whole table at once here.

Silver: the current state of those bronze files (latest version per key, lineage dropped) to one
Parquet file, each in its own process: this project's current-state asset materialized through
Dagster (DuckDB over the files in place, the Parquet IO manager with its defaults: row groups end
at DATALAKE_BATCH_BYTES), polars' lazy scan sunk by its streaming engine, and polars reading the
files eagerly (what a DataFrame-loading IO manager such as dagster-polars' hands the asset).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.extract_bench import RESULTS, Measure, run_measured, tool, tool_out_dir
from datalake_tests.services import start_mariadb

SCHEMA = "v3_docs"
DOCUMENT_BYTES = 32 * 16384  # REPEAT(MD5(id), 16384)
TOOLS = ("project", "connectorx", "dlt", "pandas")
SILVER_TOOLS = ("project", "polars_lazy", "polars_eager")


def _documents(engine: sa.Engine, rows: int) -> str:
    name = f"document_{rows}"
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS {SCHEMA}")
        conn.exec_driver_sql(
            f"CREATE TABLE {SCHEMA}.{name} (document_id BIGINT PRIMARY KEY, kind VARCHAR(16) NOT NULL, "
            "body LONGTEXT NOT NULL, created_at DATETIME(6) NOT NULL) ENGINE=InnoDB"
        )
        conn.exec_driver_sql(
            f"INSERT INTO {SCHEMA}.{name} SELECT seq, ELT(1 + MOD(seq, 3), 'invoice', 'contract', 'note'), "
            f"REPEAT(MD5(seq), 16384), NOW(6) FROM {SCHEMA}.seq_1_to_{rows}"
        )
        conn.exec_driver_sql(f"ANALYZE TABLE {SCHEMA}.{name}")
    return name


def _silver(name: str, bronze: Path, table: str, work: Path, rows: int) -> dict[str, Any]:
    print(f"    silver: {name} ...", flush=True)
    out_dir = work / f"silver-{name}"
    out, wall, rss = run_measured(
        [sys.executable, "-m", "bench.silver_tools", name, str(bronze), table, str(out_dir)]
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    result = json.loads(out.strip().splitlines()[-1])
    if result["rows"] != rows:
        raise RuntimeError(f"silver {name} wrote {result['rows']} of {rows} rows")
    return {"tool": name, **result, "process_seconds": wall, "peak_rss_mb": rss}


def _silver_cell(m: dict[str, Any]) -> str:
    return f"{m['peak_rss_mb']:,.0f} MB / {m['seconds']:.1f} s ({m['row_groups']:.0f})"


def main() -> None:
    sizes = [int(x) for x in os.environ.get("BENCH_WIDE_ROWS", "400,1600").split(",") if x]
    work = Path(tempfile.mkdtemp(prefix="bench-wide-"))
    server = start_mariadb(work / "mariadb")
    env = {"BENCH_KEY": "document_id", "BENCH_DATE_COLUMN": "created_at"}
    try:
        engine = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
        results: dict[int, list[Measure]] = {}
        silver: dict[int, list[dict[str, Any]]] = {}
        for rows in sizes:
            print(f"  {rows:,} documents of {DOCUMENT_BYTES // 1024} KB ...", flush=True)
            table = _documents(engine, rows)
            results[rows] = []
            for name in TOOLS:
                print(f"    {name} ...", flush=True)
                measure = tool(name, server.url(), SCHEMA, table, work, env, keep=name == "project")
                if measure.rows != rows:
                    raise RuntimeError(f"{name} extracted {measure.rows} of {rows} rows")
                results[rows].append(measure)
            bronze = tool_out_dir("project", table, work) / "bronze"
            silver[rows] = [_silver(name, bronze, table, work, rows) for name in SILVER_TOOLS]
            shutil.rmtree(bronze.parent, ignore_errors=True)
        engine.dispose()
        header = "".join(f"{f'{n:,} docs ({n * DOCUMENT_BYTES / 1e6:.0f} MB)':>32}" for n in sizes)
        print(f"\nExtract {SCHEMA}.document_N (LONGTEXT documents of 512 KB) to Parquet: peak RSS MB / s\n")
        print(f"  {'tool':<12}{header}")
        for i, name in enumerate(TOOLS):
            cells = "".join(
                f"{f'{results[n][i].peak_rss_mb:,.0f} MB / {results[n][i].seconds:.1f} s':>32}" for n in sizes
            )
            print(f"  {name:<12}{cells}")
        print("\nSilver current state of the bronze documents to Parquet: peak RSS MB / s (row groups)\n")
        print(f"  {'tool':<14}{header}")
        for i, name in enumerate(SILVER_TOOLS):
            cells = "".join(f"{_silver_cell(silver[n][i]):>32}" for n in sizes)
            print(f"  {name:<14}{cells}")
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "wide.json").write_text(
            json.dumps(
                {
                    "document_bytes": DOCUMENT_BYTES,
                    "runs": {str(n): [asdict(m) for m in ms] for n, ms in results.items()},
                    "silver": {str(n): ms for n, ms in silver.items()},
                },
                indent=2,
            )
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
