"""Lake benchmark: how silver/gold read bronze, and single-run range backfills.

    make bench                                   # everything
    uv run python -m bench lake                  # this one (10M rows)
    BENCH_LAKE_ROWS=1000000 uv run python -m bench lake
    BENCH_LAKE_REMOTE_THREADS=2 uv run python -m bench lake   # (d) with DuckDB's 2 threads on Azure
    uv run python -m bench.lake_bench --rows 1000000 --repeat 1

(a) Option A vs B — a partner slice (``WHERE partner_id = …``, aggregate by call type) over
    CDR-like bronze Parquet spread across daily partitions, materialized the way a user runs it
    (``dg.materialize`` of an asset, through the project's IO managers):
      - duckdb:       the asset takes ``ParquetPaths`` (DuckDB path input manager); DuckDB reads in place
      - polars_eager: the asset takes ``pl.DataFrame`` (every file loaded first)
      - polars_lazy:  the asset takes ``pl.LazyFrame`` (scan; result sunk by the Parquet IO manager)
(b) A 30-partition single-run backfill of a daily aggregate vs 30 separate runs.
(c) How a range output is split into one file per partition: the project's streaming splitter
    vs DuckDB ``COPY … PARTITION_BY`` (+ moves) vs one filtered ``COPY`` per partition.
(d) The slice of (a) with the bronze files on Azure (an Azurite emulator on loopback, started for the
    bench): DuckDB through Arrow's Azure client (the default) and through adlfs, vs polars' lazy scan
    (its native object_store reader). Azurite on loopback has no network latency; real ADLS adds it
    to every request, so each variant also runs through ``bench.latency_proxy`` adding 10 ms.

Each measurement runs in a fresh process; its peak RSS comes from ``os.wait4`` (that child's own
rusage). Times exclude interpreter start and imports: "run" is the ``dg.materialize`` call,
"step" the asset's step (input load + compute + output write, from Dagster's step events). A
warm-up run of a pyarrow-only asset takes Dagster's first-run costs; each engine's own first use
(DuckDB's first database, polars' first query) falls in the step, as in a run worker.
Memory targets use the step's increment over the process's baseline after imports (Dagster
alone is ~200 MB, the same for every variant); totals are printed too.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
DATA_ROOT = REPO / "tmp" / "bench" / "lake"
START = "2025-01-01"
PARTNER = 42
VARIANTS = ("duckdb", "polars_eager", "polars_lazy")
AZURE_VARIANTS = ("azure_duckdb", "azure_duckdb_adlfs", "azure_polars_lazy")
# How a child reaches the bench's Azurite (its well-known development key, not a secret).
AZURE_ENV: tuple[str, ...] = ("BENCH_AZURE_ENDPOINT", "BENCH_AZURE_KEY", "BENCH_AZURE_ROOT")
LATENCY_MS = 10  # added to each request for the (d) variants marked "+10 ms"
SPLITS = ("stream", "copy_partition_by", "filter_per_partition")
TARGETS = {
    "duckdb_vs_eager_time": 0.3,  # <=
    "duckdb_vs_eager_rss": 0.1,  # <=
    "duckdb_vs_lazy_time": 1.0,  # <=
    "single_run_vs_separate_wall": 0.2,  # <=
}


# --- data ----------------------------------------------------------------------------------


def generate(root: Path, rows: int, days: int) -> dict[str, Any]:
    """CDR-like bronze files: one per day, rows spread evenly; partner ids hashed (no pruning).

    DuckDB makes the rows; the project's own bronze writer writes them (zstd, row groups of 100k,
    dictionaries where the first rows' values repeat, delta-encoded keys and times), so both engines
    read what bronze really holds.
    """
    import datetime as dt

    import duckdb

    from datalake.extract import dictionary_columns
    from datalake.lake import bronze_file, write_parquet
    from datalake.specs import TableSpec
    from datalake.storage import LakeStorage

    per_day = math.ceil(rows / days)
    marker = root / f".generated-v6-{per_day}x{days}"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        con = duckdb.connect()
        storage = LakeStorage(str(root / "bronze"))
        spec = TableSpec.model_validate(
            {
                "schema": "v3_billing",
                "table": "billing_cdr",
                "primary_key": ["cdr_id"],
                "cursor": {"column": "cdr_id", "kind": "integer"},
                "date_column": "started_at",
            }
        )
        for d in range(days):
            day = (dt.date.fromisoformat(START) + dt.timedelta(days=d)).isoformat()
            relation = con.sql(
                f"""
                  SELECT ({d} * {per_day} + i)::BIGINT AS cdr_id,
                         (g % 50000)::BIGINT AS customer_id,
                         (1 + h % 200)::INTEGER AS partner_id,
                         ['voice', 'sms', 'data', 'roaming'][1 + ((h // 200) % 4)::INTEGER] AS call_type,
                         '+4915' || lpad(((g // 7) % 100000000)::VARCHAR, 8, '0') AS calling_number,
                         '+4930' || lpad(((h // 9) % 100000000)::VARCHAR, 8, '0') AS called_number,
                         TIMESTAMPTZ '{day} 00:00:00+00' + to_microseconds(i * (86400000000 // {per_day})) AS started_at,
                         ((h // 800) % 3600)::INTEGER AS duration_seconds,
                         ((g // 50000) % 10000000)::BIGINT AS bytes_used,
                         (((g // 13) % 100000) / 10000)::DECIMAL(12, 4) AS cost,
                         'bench' AS _datalake_run_id,
                         TIMESTAMPTZ '{day} 23:59:00+00' AS _datalake_extracted_at,
                         i::BIGINT AS _datalake_row_seq
                  -- two independent hashes; fields take different digits, so they are uncorrelated
                  FROM (SELECT i, hash(i, {d}) AS h, hash(i * 7919 + {d} * 1000003) AS g FROM range({per_day}) t(i))
                """
            )
            reader = relation.to_arrow_reader(100_000)
            write_parquet(
                storage,
                bronze_file("billing_cdr", day, "bench0000000000000000000000000000"),
                reader.schema,
                reader,
                row_group_size=100_000,
                use_dictionary=lambda first: dictionary_columns(spec, first),
            )
        marker.touch()
    files = sorted((root / "bronze").rglob("*.parquet"))
    return {
        "rows": per_day * days,
        "days": days,
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
    }


def warm_page_cache(root: Path) -> None:
    # Every variant then reads from the page cache: the comparison is of the readers, not the disk.
    for path in (root / "bronze").rglob("*.parquet"):
        with path.open("rb") as handle:
            while handle.read(1 << 24):
                pass


def _keys(days: int) -> list[str]:
    import datetime as dt

    return [(dt.date.fromisoformat(START) + dt.timedelta(days=d)).isoformat() for d in range(days)]


def _file_rows(directory: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    return {p.stem: pq.read_metadata(p).num_rows for p in sorted(directory.glob("*.parquet"))}


# --- children -------------------------------------------------------------------------------


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _daily(days: int) -> Any:
    import datetime as dt

    import dagster as dg

    end = (dt.date.fromisoformat(START) + dt.timedelta(days=days)).isoformat()
    return dg.DailyPartitionsDefinition(start_date=START, end_date=end)


def _resources(data: Path, out: Path, azure_reader: str | None = None) -> dict[str, Any]:
    """Local roots; with ``azure_reader`` the bronze root is the bench's Azurite (see AZURE_ENV)."""
    from datalake.io_managers import BronzeIOManager, DuckDBPathInputManager, ParquetIOManager
    from datalake.lake import DuckDBResource

    roots = {"bronze_io_manager": str(data / "bronze"), "revsci_io_manager": str(out)}
    azure = None
    if azure_reader is not None:
        from dagster_azure.adls2 import ADLS2Key

        from datalake.azure import AzureBlobResource

        endpoint, key, root = (os.environ[name] for name in AZURE_ENV)
        azure = AzureBlobResource(
            credential=ADLS2Key(key=key),
            blob_endpoint=endpoint,
            duckdb_reader="adlfs" if azure_reader == "adlfs" else "arrow",
        )
        roots["bronze_io_manager"] = root
    return {
        "bronze_io_manager": BronzeIOManager(root=roots["bronze_io_manager"], azure=azure),
        "revsci_io_manager": ParquetIOManager(root=roots["revsci_io_manager"]),
        "duckdb_path_input_manager": DuckDBPathInputManager(roots=roots, azure=azure),
        # BENCH_LAKE_REMOTE_THREADS: the threads of a connection reading Azure files (default 16).
        "duckdb_resource": DuckDBResource(
            memory_limit="4GB", remote_threads=int(os.environ.get("BENCH_LAKE_REMOTE_THREADS", "16"))
        ),
    }


def start_latency_proxy(server: Any, env: dict[str, str]) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """``bench.latency_proxy`` in front of Azurite; returns it and the children's env through it."""
    from datalake_tests.services import free_port

    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "bench.latency_proxy", str(port), str(server.blob_port), str(LATENCY_MS)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proxy.stdout is not None
    if proxy.stdout.readline().strip() != "listening":
        proxy.kill()
        raise RuntimeError("latency proxy did not start")
    endpoint = env["BENCH_AZURE_ENDPOINT"].replace(f":{server.blob_port}/", f":{port}/")
    return proxy, {**env, "BENCH_AZURE_ENDPOINT": endpoint}


def upload_to_azurite(data: Path, base: Path) -> tuple[Any, dict[str, str]]:
    """Starts Azurite and copies the bronze files into it; returns the server and the children's env."""
    from datalake.storage import LakeStorage
    from datalake_tests.lake_roots import azure_url, ensure_container, key_resource
    from datalake_tests.services import start_azurite

    server = start_azurite(base)
    try:
        ensure_container(server)
        root = azure_url(server, "bench/bronze")
        storage = LakeStorage(root, key_resource(server))
        for path in sorted((data / "bronze").rglob("*.parquet")):
            storage.fs.put(str(path), storage.path(str(path.relative_to(data / "bronze"))))
    except BaseException:
        server.stop()
        raise
    env = dict(zip(AZURE_ENV, (server.blob_endpoint, server.account_key, root), strict=True))
    return server, env


def _step_seconds(instance: Any, run_id: str) -> float:
    import dagster as dg

    stamps: dict[str, list[float]] = {"start": [], "end": []}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            stamps["start"].append(record.timestamp)
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            stamps["end"].append(record.timestamp)
    return max(stamps["end"]) - min(stamps["start"])


def _engine_seconds(variant: str, data: Path) -> float:
    """The same slice on the same files with the engine alone: what the IO path adds is the rest."""
    import duckdb
    import polars as pl

    files = sorted(str(p) for p in (data / "bronze").rglob("*.parquet"))
    aggregates = [pl.len().alias("cdrs"), pl.col("duration_seconds").sum(), pl.col("cost").sum()]

    def run() -> object:
        if variant == "duckdb":
            con = duckdb.connect(config={"memory_limit": "4GB"})
            con.read_parquet(files, union_by_name=True).create_view("cdr")
            return con.sql(
                "SELECT call_type, count(*), sum(duration_seconds), sum(cost) FROM cdr "
                f"WHERE partner_id = {PARTNER} GROUP BY call_type"
            ).fetchall()
        if variant == "polars_eager":
            frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
            return frame.filter(pl.col("partner_id") == PARTNER).group_by("call_type").agg(aggregates)
        lazy = pl.concat([pl.scan_parquet(f) for f in files], how="diagonal_relaxed")
        return lazy.filter(pl.col("partner_id") == PARTNER).group_by("call_type").agg(aggregates).collect()

    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def child_slice(variant: str, data: Path, days: int) -> dict[str, Any]:
    import dagster as dg
    import duckdb
    import polars as pl
    import pyarrow as pa

    from datalake.lake import DuckDBResource, ParquetPaths

    cdr = dg.AssetSpec(key=["bronze", "billing_cdr"], partitions_def=_daily(days)).with_io_manager_key(
        "bronze_io_manager"
    )
    key = ["revsci", "partner_slice"]

    class Slice(dg.Config):
        partner_id: int

    azure_reader = None
    if variant.startswith("azure_"):
        azure_reader = "adlfs" if variant.endswith("_adlfs") else "arrow"
        variant = variant.removeprefix("azure_").removesuffix("_adlfs")
    if variant == "duckdb":

        @dg.asset(
            key=key,
            io_manager_key="revsci_io_manager",
            ins={"billing_cdr": dg.AssetIn(key=cdr.key, input_manager_key="duckdb_path_input_manager")},
        )
        def partner_slice(
            config: Slice, billing_cdr: ParquetPaths, duckdb_resource: DuckDBResource
        ) -> duckdb.DuckDBPyRelation:
            con = duckdb_resource.connect()
            billing_cdr.view(con, "cdr")
            return con.sql(
                "SELECT call_type, count(*) AS cdrs, sum(duration_seconds) AS duration_seconds, "
                "sum(cost) AS cost FROM cdr WHERE partner_id = $p GROUP BY call_type",
                params={"p": config.partner_id},
            )

    elif variant == "polars_eager":

        @dg.asset(key=key, io_manager_key="revsci_io_manager", ins={"billing_cdr": dg.AssetIn(key=cdr.key)})
        def partner_slice(config: Slice, billing_cdr: pl.DataFrame) -> pl.DataFrame:
            return (
                billing_cdr.filter(pl.col("partner_id") == config.partner_id)
                .group_by("call_type")
                .agg(
                    pl.len().alias("cdrs"),
                    pl.col("duration_seconds").sum(),
                    pl.col("cost").sum(),
                )
            )

    else:

        @dg.asset(key=key, io_manager_key="revsci_io_manager", ins={"billing_cdr": dg.AssetIn(key=cdr.key)})
        def partner_slice(config: Slice, billing_cdr: pl.LazyFrame) -> pl.LazyFrame:
            return (
                billing_cdr.filter(pl.col("partner_id") == config.partner_id)
                .group_by("call_type")
                .agg(
                    pl.len().alias("cdrs"),
                    pl.col("duration_seconds").sum(),
                    pl.col("cost").sum(),
                )
            )

    @dg.asset(io_manager_key="revsci_io_manager")
    def warmup() -> pa.Table:
        # pyarrow only: neither DuckDB nor polars is used before the measured step, as in a run
        # worker (a polars warm-up here hid polars' first-use cost and not DuckDB's first connect).
        return pa.table({"x": [1]})

    out = Path(tempfile.mkdtemp(prefix="lake-bench-out-"))
    try:
        resources = _resources(data, out, azure_reader)
        dg.materialize([warmup], resources=resources)  # Dagster's first-run costs, outside the measure
        instance = dg.DagsterInstance.ephemeral()
        baseline = _rss_mb()
        started = time.perf_counter()
        result = dg.materialize(
            [cdr, partner_slice],
            resources=resources,
            selection=[partner_slice],
            instance=instance,
            run_config=dg.RunConfig(ops={"revsci__partner_slice": Slice(partner_id=PARTNER)}),
        )
        run_seconds = time.perf_counter() - started
        frame = pl.read_parquet(out / "partner_slice" / "partner_slice.parquet").sort("call_type")
        answer = [
            (r["call_type"], int(r["cdrs"]), int(r["duration_seconds"])) for r in frame.iter_rows(named=True)
        ]
        return {
            "run_seconds": run_seconds,
            "step_seconds": _step_seconds(instance, result.run_id),
            # The engines alone on local files (not measured for the Azure variants).
            **({"engine_seconds": _engine_seconds(variant, data)} if azure_reader is None else {}),
            "baseline_rss_mb": baseline,
            "answer": answer,
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def child_backfill(mode: str, data: Path, days: int, out: Path | None = None) -> dict[str, Any]:
    """``single``: one run for the range; ``separate``: one in-process run per partition;
    ``one=<key>``: the run of one partition, in this process (the parent starts one per key)."""
    import dagster as dg
    import duckdb
    import pyarrow.parquet as pq

    from datalake.lake import PARTITION_COLUMN_KEY, DuckDBResource, ParquetPaths

    daily = _daily(days)
    cdr = dg.AssetSpec(key=["bronze", "billing_cdr"], partitions_def=daily).with_io_manager_key(
        "bronze_io_manager"
    )

    @dg.asset(
        key=["revsci", "daily_partner_usage"],
        partitions_def=daily,
        backfill_policy=dg.BackfillPolicy.single_run(),
        io_manager_key="revsci_io_manager",
        ins={"billing_cdr": dg.AssetIn(key=cdr.key, input_manager_key="duckdb_path_input_manager")},
        metadata={PARTITION_COLUMN_KEY: "usage_date"},
    )
    def daily_partner_usage(
        billing_cdr: ParquetPaths, duckdb_resource: DuckDBResource
    ) -> duckdb.DuckDBPyRelation:
        con = duckdb_resource.connect()
        billing_cdr.view(con, "cdr")
        return con.sql(
            "SELECT CAST(timezone('UTC', started_at) AS DATE) AS usage_date, partner_id, call_type, "
            "count(*) AS cdrs, sum(duration_seconds) AS duration_seconds, sum(cost) AS cost "
            "FROM cdr GROUP BY ALL ORDER BY usage_date, partner_id, call_type"
        )

    own_out = out is None
    target = out or Path(tempfile.mkdtemp(prefix="lake-bench-backfill-"))
    try:
        resources = _resources(data, target)
        keys = daily.get_partition_keys()
        assets = [cdr, daily_partner_usage]
        select = [daily_partner_usage]
        range_tags = {
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        }
        if mode.startswith("one="):
            # What a launched run does in its own process: load the code, run one partition.
            dg.materialize(assets, resources=resources, selection=select, partition_key=mode.split("=", 1)[1])
            return {}
        if mode == "launched_range":  # the same for the single-run backfill: one process, the range
            dg.materialize(assets, resources=resources, selection=select, tags=range_tags)
            return {}
        dg.materialize(assets, resources=resources, selection=select, partition_key=keys[0])
        shutil.rmtree(target / "daily_partner_usage")  # that was the warm-up
        instance = dg.DagsterInstance.ephemeral()
        started = time.perf_counter()
        if mode == "single":
            dg.materialize(assets, resources=resources, selection=select, instance=instance, tags=range_tags)
        else:
            for key in keys:
                dg.materialize(
                    assets, resources=resources, selection=select, instance=instance, partition_key=key
                )
        wall = time.perf_counter() - started
        files = sorted((target / "daily_partner_usage").glob("*.parquet"))
        return {
            "wall_seconds": wall,
            "runs": 1 if mode == "single" else len(keys),
            "rows": {p.stem: pq.read_metadata(p).num_rows for p in files},
        }
    finally:
        if own_out:
            shutil.rmtree(target, ignore_errors=True)


def child_split(strategy: str, data: Path, days: int) -> dict[str, Any]:
    """Split every CDR of the range (a pass-through silver fact) into one file per day."""
    import duckdb

    from datalake.lake import DEFAULT_ROW_GROUP_SIZE, PartitionAssigner, write_partitions
    from datalake.storage import LakeStorage

    daily = _daily(days)
    keys = daily.get_partition_keys()
    out = Path(tempfile.mkdtemp(prefix="lake-bench-split-"))
    con = duckdb.connect(config={"memory_limit": "4GB", "temp_directory": str(out / ".spill")})
    files = sorted(str(p) for p in (data / "bronze").rglob("*.parquet"))
    source = con.read_parquet(files).query(
        "src", "SELECT CAST(timezone('UTC', started_at) AS DATE) AS usage_date, * FROM src"
    )
    assert source is not None  # a SELECT always gives a relation
    baseline = _rss_mb()
    started = time.perf_counter()
    try:
        if strategy == "stream":
            storage = LakeStorage(str(out))
            assigner = PartitionAssigner.for_partitions(daily, keys, "usage_date")
            written = write_partitions(
                storage,
                {k: f"cdr/{k}.parquet" for k in keys},
                source,
                assigner,
                row_group_size=DEFAULT_ROW_GROUP_SIZE,
            )
            rows = {k: w.rows for k, w in written.items()}
        elif strategy == "copy_partition_by":
            staging = out / ".staging"
            source.write_parquet(
                str(staging),
                partition_by=["usage_date"],
                compression="zstd",
                row_group_size=DEFAULT_ROW_GROUP_SIZE,
            )
            (out / "cdr").mkdir()
            rows = {}
            for key in keys:
                parts = list((staging / f"usage_date={key}").glob("*.parquet"))
                assert len(parts) == 1, parts
                os.replace(parts[0], out / "cdr" / f"{key}.parquet")
                rows[key] = con.sql(f"SELECT count(*) FROM '{out / 'cdr' / key}.parquet'").fetchall()[0][0]
        else:
            (out / "cdr").mkdir()
            rows = {}
            for key in keys:
                temp = out / "cdr" / f".{key}.parquet.inprogress"
                source.filter(f"usage_date = DATE '{key}'").write_parquet(
                    str(temp), compression="zstd", row_group_size=DEFAULT_ROW_GROUP_SIZE
                )
                os.replace(temp, out / "cdr" / f"{key}.parquet")
                rows[key] = con.sql(f"SELECT count(*) FROM '{out / 'cdr' / key}.parquet'").fetchall()[0][0]
        return {"wall_seconds": time.perf_counter() - started, "baseline_rss_mb": baseline, "rows": rows}
    finally:
        shutil.rmtree(out, ignore_errors=True)


CHILDREN = {"slice": child_slice, "backfill": child_backfill, "split": child_split}


def run_child(
    kind: str, variant: str, data: Path, days: int, out: Path | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.lake_bench", "--child", f"{kind}:{variant}", "--data", str(data)]
    cmd += ["--days", str(days)] + (["--out", str(out)] if out else [])
    started = time.perf_counter()
    # Output goes to files, not pipes: the parent only waits (a full pipe would block the child).
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=stdout, stderr=stderr, text=True, env={**os.environ, **(env or {})}
        )
        # wait4: this child's own rusage (ru_maxrss is its peak RSS, in KiB on Linux).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        printed, errors = stdout.read(), stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind}:{variant} failed ({proc.returncode}):\n{errors[-4000:]}")
    report = json.loads(printed.strip().splitlines()[-1])
    report["peak_rss_mb"] = usage.ru_maxrss / 1024
    report["process_seconds"] = time.perf_counter() - started
    if "baseline_rss_mb" in report:
        report["increment_rss_mb"] = max(report["peak_rss_mb"] - report["baseline_rss_mb"], 0.0)
    return report


# --- main ------------------------------------------------------------------------------------


def _median(reports: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in reports)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lake_bench", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--rows", type=int, default=int(os.environ.get("BENCH_LAKE_ROWS", "10000000")))
    parser.add_argument("--days", type=int, default=int(os.environ.get("BENCH_LAKE_DAYS", "30")))
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("BENCH_LAKE_REPEAT", "3")))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    # Called by `python -m bench` with no arguments: configuration comes from the environment.
    args = parser.parse_args([] if argv is None else argv)
    if args.child:
        kind, variant = args.child.split(":", 1)
        extra = {"out": Path(args.out)} if args.out else {}
        print(json.dumps(CHILDREN[kind](variant, Path(args.data), args.days, **extra)))
        return

    data = DATA_ROOT / f"{args.rows}x{args.days}"
    print(f"generating {args.rows:,} CDR rows over {args.days} daily partitions in {data} ...", flush=True)
    started = time.perf_counter()
    shape = generate(data, args.rows, args.days)
    print(
        f"  {shape['rows']:,} rows, {shape['files']} files, {shape['bytes'] / 1e6:.0f} MB "
        f"({time.perf_counter() - started:.1f} s)",
        flush=True,
    )
    warm_page_cache(data)

    slices: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeat):
        for variant in VARIANTS:  # interleaved, so drift in machine load hits every variant alike
            print(f"  slice {variant} ...", flush=True)
            slices.setdefault(variant, []).append(run_child("slice", variant, data, args.days))
    answers = {json.dumps(r["answer"]) for reports in slices.values() for r in reports}
    keys = ("step_seconds", "run_seconds", "engine_seconds", "peak_rss_mb", "increment_rss_mb")
    summary = {v: {k: _median(rs, k) for k in keys} for v, rs in slices.items()}

    backfill = {}
    for mode in ("single", "separate"):
        print(f"  backfill {mode} (in one process) ...", flush=True)
        backfill[mode] = run_child("backfill", mode, data, args.days)
    # As deployed, every run is a process of its own (the run launcher's): code load included.
    launched: dict[str, dict[str, Any]] = {}
    for mode in ("range", "per_partition"):
        print(f"  backfill {mode} (a process per run) ...", flush=True)
        out = Path(tempfile.mkdtemp(prefix="lake-bench-launched-"))
        try:
            started = time.perf_counter()
            reports = (
                [run_child("backfill", "launched_range", data, args.days, out=out)]
                if mode == "range"
                else [
                    run_child("backfill", f"one={key}", data, args.days, out=out) for key in _keys(args.days)
                ]
            )
            launched[mode] = {
                "wall_seconds": time.perf_counter() - started,
                "runs": len(reports),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in reports),
                "rows": _file_rows(out / "daily_partner_usage"),
            }
        finally:
            shutil.rmtree(out, ignore_errors=True)

    splits = {}
    for strategy in SPLITS:
        print(f"  split {strategy} ...", flush=True)
        splits[strategy] = run_child("split", strategy, data, args.days)

    print("  starting Azurite and uploading the bronze files ...", flush=True)
    azure_work = Path(tempfile.mkdtemp(prefix="lake-bench-azurite-"))
    server, azure_env = upload_to_azurite(data, azure_work)
    proxy = None
    azure_slices: dict[str, list[dict[str, Any]]] = {}
    try:
        proxy, latency_env = start_latency_proxy(server, azure_env)
        for _ in range(args.repeat):
            for label, env in (("", azure_env), ("+latency", latency_env)):
                for variant in AZURE_VARIANTS:
                    print(f"  slice {variant}{label} ...", flush=True)
                    azure_slices.setdefault(variant + label, []).append(
                        run_child("slice", variant, data, args.days, env=env)
                    )
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait()
        server.stop()
        shutil.rmtree(azure_work, ignore_errors=True)
    answers |= {json.dumps(r["answer"]) for reports in azure_slices.values() for r in reports}
    azure_keys = ("step_seconds", "run_seconds", "peak_rss_mb", "increment_rss_mb")
    azure_summary = {v: {k: _median(rs, k) for k in azure_keys} for v, rs in azure_slices.items()}

    d, e, lazy = summary["duckdb"], summary["polars_eager"], summary["polars_lazy"]
    ratios = {
        "duckdb_vs_eager_time": d["step_seconds"] / e["step_seconds"],
        "duckdb_vs_eager_rss": d["increment_rss_mb"] / max(e["increment_rss_mb"], 1e-9),
        "duckdb_vs_lazy_time": d["step_seconds"] / lazy["step_seconds"],
        "single_run_vs_separate_wall": launched["range"]["wall_seconds"]
        / launched["per_partition"]["wall_seconds"],
        "single_run_vs_separate_wall_in_process": backfill["single"]["wall_seconds"]
        / backfill["separate"]["wall_seconds"],
        "duckdb_vs_lazy_engine_only": d["engine_seconds"] / lazy["engine_seconds"],
        **{
            f"{variant}{label}_vs_lazy_time": azure_summary[variant + label]["step_seconds"]
            / azure_summary["azure_polars_lazy" + label]["step_seconds"]
            for variant in ("azure_duckdb", "azure_duckdb_adlfs")
            for label in ("", "+latency")
        },
    }
    met = {k: ratios[k] <= limit for k, limit in TARGETS.items()}

    print(
        f"\n(a) Partner slice (partner_id = {PARTNER}, by call type) over {shape['rows']:,} bronze rows, "
        f"{shape['files']} files / {shape['bytes'] / 1e6:.0f} MB; median of {args.repeat}, each in its own process:\n"
    )
    print(
        f"  {'variant':<40} {'step s':>7} {'run s':>7} {'engine s':>9} {'peak RSS MB':>12} {'step +RSS MB':>13}"
    )
    labels = {
        "duckdb": "A  DuckDB via ParquetPaths (path input)",
        "polars_eager": "B  polars eager (pl.DataFrame input)",
        "polars_lazy": "C  polars lazy (pl.LazyFrame input)",
    }
    for v in VARIANTS:
        m = summary[v]
        print(
            f"  {labels[v]:<40} {m['step_seconds']:>7.2f} {m['run_seconds']:>7.2f} {m['engine_seconds']:>9.2f} "
            f"{m['peak_rss_mb']:>12.0f} {m['increment_rss_mb']:>13.0f}"
        )
    print(f"  all variants give the same answer: {'yes' if len(answers) == 1 else 'NO'}")
    print("  step = the asset's step (input load + query + output write); run = the dg.materialize call;")
    print("  engine = the same query on the same files without Dagster or the IO managers (best of 3)")

    single, separate = backfill["single"], backfill["separate"]
    same = (
        single["rows"] == separate["rows"] == launched["range"]["rows"] == launched["per_partition"]["rows"]
    )
    print(f"\n(b) {args.days}-partition backfill of a daily partner aggregate (DuckDB, path input):\n")
    print(f"  {'mode':<52} {'runs':>5} {'wall s':>8} {'peak RSS MB':>12}")
    for label, r in (
        ("single-run backfill, launched as its own process", launched["range"]),
        ("separate runs, each launched as its own process", launched["per_partition"]),
        ("single-run backfill, in an already-loaded process", single),
        ("separate runs, in one already-loaded process", separate),
    ):
        print(f"  {label:<52} {r['runs']:>5} {r['wall_seconds']:>8.2f} {r['peak_rss_mb']:>12.0f}")
    print(f"  same {len(single['rows'])} files and row counts in all four: {'yes' if same else 'NO'}")

    print(
        f"\n(c) Splitting a range output ({shape['rows']:,} rows) into {args.days} files, one per partition:\n"
    )
    print(f"  {'strategy':<40} {'wall s':>8} {'peak RSS MB':>12} {'+RSS MB':>8}  order kept")
    notes = {"stream": "yes (used)", "copy_partition_by": "no", "filter_per_partition": "yes"}
    for strategy in SPLITS:
        r = splits[strategy]
        print(
            f"  {strategy:<40} {r['wall_seconds']:>8.2f} {r['peak_rss_mb']:>12.0f} {r['increment_rss_mb']:>8.0f}"
            f"  {notes[strategy]}"
        )
    split_counts = {json.dumps(r["rows"], sort_keys=True) for r in splits.values()}
    print(f"  identical partition row counts: {'yes' if len(split_counts) == 1 else 'NO'}")

    print(
        f"\n(d) The slice of (a) with the bronze files on Azurite (loopback), directly and with {LATENCY_MS} ms"
        f" added to each request; median of {args.repeat}:\n"
    )
    print(f"  {'variant':<52} {'step s':>7} {'+' + str(LATENCY_MS) + ' ms':>7} {'step +RSS MB':>13}")
    azure_labels = {
        "azure_duckdb": "DuckDB path input, Arrow's Azure client (default)",
        "azure_duckdb_adlfs": "DuckDB path input, adlfs",
        "azure_polars_lazy": "polars lazy, its object_store reader",
    }
    for v in AZURE_VARIANTS:
        m, slow = azure_summary[v], azure_summary[v + "+latency"]
        print(
            f"  {azure_labels[v]:<52} {m['step_seconds']:>7.2f} {slow['step_seconds']:>7.2f}"
            f" {m['increment_rss_mb']:>13.0f}"
        )
    print(f"  same answer as on local disk: {'yes' if len(answers) == 1 else 'NO'}")

    print("\nTargets:")
    descriptions = {
        "duckdb_vs_eager_time": "DuckDB step time / polars eager",
        "duckdb_vs_eager_rss": "DuckDB step RSS increment / polars eager",
        "duckdb_vs_lazy_time": "DuckDB step time / polars lazy",
        "single_run_vs_separate_wall": "single-run backfill / separate runs (launched)",
    }
    for key, limit in TARGETS.items():
        print(
            f"  {descriptions[key]:<48} {ratios[key]:>6.3f}  (<= {limit})  {'met' if met[key] else 'NOT MET'}"
        )
    print("  for reference:")
    print(
        f"  {'  single-run / separate, in one loaded process':<48} {ratios['single_run_vs_separate_wall_in_process']:>6.3f}"
    )
    print(f"  {'  DuckDB / polars lazy, engines alone':<48} {ratios['duckdb_vs_lazy_engine_only']:>6.3f}")
    for label, note in (("", "on Azurite"), ("+latency", f"+{LATENCY_MS} ms")):
        for variant, name in (("azure_duckdb", "DuckDB"), ("azure_duckdb_adlfs", "DuckDB (adlfs)")):
            print(
                f"  {'  ' + name + ' / polars lazy, ' + note:<48} {ratios[f'{variant}{label}_vs_lazy_time']:>6.3f}"
            )

    RESULTS.mkdir(exist_ok=True)
    result_file = RESULTS / "lake.json"
    result_file.write_text(
        json.dumps(
            {
                "data": shape,
                "repeat": args.repeat,
                "slice": {"summary": summary, "runs": slices, "same_answer": len(answers) == 1},
                "backfill": {"in_process": backfill, "launched": launched, "same_rows": same},
                "split": splits,
                "azure_slice": {"summary": azure_summary, "runs": azure_slices},
                "ratios": ratios,
                "targets": TARGETS,
                "met": met,
            },
            indent=2,
        )
    )
    print(f"\nwritten {result_file.relative_to(REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
