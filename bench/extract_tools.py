"""One extraction tool per process, for bench/extract_bench.py (peak RSS is per process).

    python -m bench.extract_tools TOOL SQLALCHEMY_URL SCHEMA TABLE OUT_DIR

Prints one JSON line: {"rows": n, "seconds": extraction wall time}. Each tool first prepares
(imports; for this project also loading the code location's definitions, which a code server
does once) and returns the extraction itself, which alone is timed. Interpreter start-up and
preparation are excluded from "seconds"; the parent also records the whole process wall.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

Extraction = Callable[[], int]


def project(url: str, schema: str, table: str, out: Path, streams: int = 1) -> Extraction:
    """This project's bronze extraction as a user runs it: a Dagster materialization."""
    import datetime as dt

    import dagster as dg
    import yaml

    from datalake.definitions import build_definitions
    from datalake.settings import resolve_settings

    parts = urlsplit(url)
    ca = parse_qs(parts.query).get("ssl_ca", [""])[0]  # verified TLS (BENCH_EXTRACT_TLS)
    key = os.environ.get("BENCH_KEY", "cdr_id")  # another table's integer key (bench wide)
    registry = out / "registry.yaml"
    registry.write_text(
        yaml.safe_dump(
            {
                "tables": [
                    {
                        "schema": schema,
                        "table": table,
                        "primary_key": [key],
                        "cursor": {"column": key, "kind": "integer"},
                        "date_column": os.environ.get("BENCH_DATE_COLUMN", "created_at"),
                        "batch_size": int(os.environ.get("BENCH_BATCH_SIZE", "100000")),
                    }
                ]
            }
        )
    )
    os.environ["DATALAKE_MYSQL_PASSWORD"] = parts.password or ""
    settings = resolve_settings(
        {
            "DATALAKE_MYSQL_HOST": parts.hostname or "",
            "DATALAKE_MYSQL_PORT": str(parts.port),
            "DATALAKE_MYSQL_USER": parts.username or "",
            "DATALAKE_MYSQL_PASSWORD": parts.password or "",
            **({"DATALAKE_MYSQL_SSL_CA": ca} if ca else {}),
            "DATALAKE_REGISTRY": str(registry),
            "DATALAKE_ROOT_BRONZE": str(out / "bronze"),
            "DATALAKE_ROOT_SILVER": str(out / "silver"),
            "DATALAKE_ROOT_VANGUARD_WHOLESALE": str(out / "vw"),
            "DATALAKE_EXTRACT_LAG_SECONDS": "0",
            "DATALAKE_BRONZE_MAX_RETRIES": "0",
            "DATALAKE_EXTRACT_STREAMS": str(streams),
        }
    )
    defs = build_definitions(settings)
    # The extraction alone: the asset's checks (a source COUNT(*) among them) are not timed.
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey(["bronze", table])}, asset_check_selection=set()
    )
    today = dt.datetime.now(settings.tz).date().isoformat()
    instance = dg.DagsterInstance.ephemeral()  # a deployment's instance exists before any run
    # The libraries the extraction uses, imported before the clock starts as for every other
    # tool (connectorx ~40 ms, PyMySQL): the project imports them on first use, i.e. in a run.
    import connectorx  # noqa: F401
    import pymysql  # noqa: F401

    import datalake.arrow_reader  # noqa: F401

    def run() -> int:
        result = job.execute_in_process(
            partition_key=today,
            instance=instance,
            run_config={"ops": {f"bronze__{table}": {"config": {"mode": "full_refresh"}}}},
        )
        (event,) = result.get_asset_materialization_events()
        return int(event.materialization.metadata["dagster/row_count"].value)  # type: ignore[arg-type]

    return run


def connectorx(url: str, schema: str, table: str, out: Path) -> Extraction:
    import connectorx as cx
    import pyarrow.parquet as pq

    parts = urlsplit(url)
    cx_url = f"mysql://{parts.username}:{parts.password}@{parts.hostname}:{parts.port}/{schema}"
    ca = parse_qs(parts.query).get("ssl_ca", [""])[0]
    if ca:
        cx_url += "?" + urlencode({"ssl-mode": "verify_identity", "ssl-ca": ca})

    def run() -> int:
        reader = cx.read_sql(
            cx_url, f"SELECT * FROM {schema}.{table}", return_type="arrow_stream", batch_size=100_000
        )
        writer = pq.ParquetWriter(out / "cx.parquet", reader.schema, compression="zstd")
        rows = 0
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
        writer.close()
        return rows

    return run


def dlt(url: str, schema: str, table: str, out: Path) -> Extraction:
    import dlt as dlt_lib
    from dlt.sources.sql_database import sql_table

    os.environ["DLT_DATA_DIR"] = str(out / "dlt_data")
    os.environ["RUNTIME__LOG_LEVEL"] = "WARNING"

    def run() -> int:
        source = sql_table(credentials=url, schema=schema, table=table, backend="pyarrow", chunk_size=100_000)
        pipeline = dlt_lib.pipeline(
            pipeline_name="bench",
            destination=dlt_lib.destinations.filesystem(bucket_url=str(out / "dlt")),
            dataset_name="bronze",
            pipelines_dir=str(out / "dlt_pipelines"),
        )
        info = pipeline.run(source, loader_file_format="parquet")
        info.raise_on_failed_jobs()
        counts = pipeline.last_trace.last_normalize_info.row_counts  # type: ignore[union-attr]
        return int(counts.get(table, 0))

    return run


def pandas(url: str, schema: str, table: str, out: Path) -> Extraction:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import sqlalchemy as sa

    def run() -> int:
        engine = sa.create_engine(url)
        writer = None
        rows = 0
        with engine.connect().execution_options(stream_results=True) as conn:
            for chunk in pd.read_sql(sa.text(f"SELECT * FROM {schema}.{table}"), conn, chunksize=100_000):
                batch = pa.Table.from_pandas(chunk, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(out / "pandas.parquet", batch.schema, compression="zstd")
                writer.write_table(batch.cast(writer.schema))
                rows += len(chunk)
        if writer is not None:
            writer.close()
        return rows

    return run


def project_two_streams(url: str, schema: str, table: str, out: Path) -> Extraction:
    """The same with DATALAKE_EXTRACT_STREAMS=2: the window read in two parallel streams."""
    return project(url, schema, table, out, streams=2)


TOOLS = {
    "project": project,
    "project-2-streams": project_two_streams,
    "connectorx": connectorx,
    "dlt": dlt,
    "pandas": pandas,
}


if __name__ == "__main__":
    tool, url, schema, table, out = sys.argv[1:6]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    extraction = TOOLS[tool](url, schema, table, out_dir)
    started = time.perf_counter()
    rows = extraction()
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - started}), flush=True)
