"""Silver and gold in bounded memory: wide rows written in byte-bounded row groups, and DuckDB
spilling beyond its memory limit to a directory it can write (not the working directory).

The silver asset here is the real current-state asset of a registry table; it runs through
Dagster with the real path input manager and Parquet IO manager, on local disk and on Azurite.
"""

import datetime as dt
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.compute
import pytest

from datalake.assets.silver import build_current_state_asset, current_state
from datalake.definitions import build_resources
from datalake.extract import LINEAGE_FIELDS
from datalake.io_managers import DuckDBPathInputManager, ParquetIOManager
from datalake.lake import (
    DUCKDB_VECTOR_ROWS,
    DuckDBResource,
    ParquetPaths,
    PartitionAssigner,
    bronze_file,
    relation_batch_rows,
    write_parquet,
    write_partitions,
)
from datalake.settings import resolve_settings
from datalake.specs import TableSpec
from datalake.storage import LakeStorage
from datalake_tests.lake_roots import ROOT_KINDS, LakeRoot, make_root

# pyarrow.compute's kernels are generated at import time; type checkers cannot see them.
pc: Any = pyarrow.compute

DOCS = TableSpec.model_validate(
    {
        "schema": "v3_docs",
        "table": "docs",
        "primary_key": ["doc_id"],
        "cursor": {"column": "updated_at", "kind": "timestamp"},
    }
)
UTC_US = pa.timestamp("us", tz="UTC")
DOC_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("kind", pa.string()),
        ("updated_at", UTC_US),
        ("body", pa.string()),
        *LINEAGE_FIELDS,
    ]
)
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
DOC_BYTES = 128 * 1024


@pytest.fixture(params=ROOT_KINDS)
def lake_root(request: pytest.FixtureRequest, tmp_path: Path) -> LakeRoot:
    return make_root(request.param, tmp_path, request)


def _body(doc_id: int, version: int) -> str:
    seed = hashlib.sha256(f"{doc_id}/{version}".encode()).hexdigest()
    return (seed * (DOC_BYTES // len(seed) + 1))[:DOC_BYTES]


def _doc_batches(docs: int, versions: int) -> Iterator[pa.RecordBatch]:
    """Every document in ``versions`` versions (the last one newest), two rows per batch."""
    seq = 0
    for version in range(versions):
        for first in range(0, docs, 2):
            ids = list(range(first, min(first + 2, docs)))
            n = len(ids)
            yield pa.record_batch(
                [
                    pa.array(ids, pa.int64()),
                    pa.array(["memo" if i % 2 else "contract" for i in ids]),
                    pa.array([T0 + dt.timedelta(hours=version)] * n, UTC_US),
                    pa.array([_body(i, version) for i in ids]),
                    pa.array(["run-a"] * n),
                    pa.array([T0] * n, UTC_US),
                    pa.array(range(seq, seq + n), pa.int64()),
                    pa.array([False] * n),
                ],
                schema=DOC_SCHEMA,
            )
            seq += n


def _row_group_bytes(storage: LakeStorage, relative: str) -> list[int]:
    """Arrow bytes of each row group of a file, read back one row group at a time."""
    import pyarrow.parquet as pq

    with storage.open_read(relative) as handle:
        file = pq.ParquetFile(handle)
        return [file.read_row_group(i).nbytes for i in range(file.num_row_groups)]


def test_wide_silver_rows_are_read_from_duckdb_and_written_in_bounded_bytes(lake_root: LakeRoot) -> None:
    """40 documents of 128 KB, two versions each, deduplicated by the real current-state asset.

    DuckDB's batches are sized from the bronze input's width (its footer) and the row groups end
    at the byte bound: ~1 MiB row groups, not one row group of everything."""
    bronze = LakeStorage(lake_root.sub("bronze"), lake_root.azure)
    write_parquet(
        bronze,
        bronze_file("docs", "2025-01-01", "run-a"),
        DOC_SCHEMA,
        _doc_batches(40, 2),
        row_group_size=100_000,
        row_group_bytes=2 * 2**20,
    )
    roots = {"bronze_io_manager": lake_root.sub("bronze"), "silver_io_manager": lake_root.sub("silver")}
    bound = 2**20
    result = dg.materialize(
        [dg.AssetSpec(["bronze", "docs"]), build_current_state_asset(DOCS)],
        resources={
            "duckdb_resource": DuckDBResource(),
            "duckdb_path_input_manager": DuckDBPathInputManager(roots=roots, azure=lake_root.azure),
            "silver_io_manager": ParquetIOManager(
                root=roots["silver_io_manager"], azure=lake_root.azure, row_group_bytes=bound
            ),
        },
        selection=[dg.AssetKey(["silver", "docs_current"])],
    )
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["dagster/row_count"].value == 40

    silver = LakeStorage(lake_root.sub("silver"), lake_root.azure)
    relative = "docs_current/docs_current.parquet"
    sizes = _row_group_bytes(silver, relative)
    # 40 x 128 KB = 5 MiB in row groups of at most the bound plus one DuckDB batch (1 row here).
    assert len(sizes) >= 5, sizes
    assert max(sizes) <= bound + DOC_BYTES + 4096, sizes
    assert metadata["datalake/row_groups"].value == len(sizes)

    import pyarrow.parquet as pq

    with silver.open_read(relative) as handle:
        table = pq.read_table(handle).sort_by("doc_id")
    assert table.column("doc_id").to_pylist() == list(range(40))
    assert table.column("updated_at").to_pylist() == [T0 + dt.timedelta(hours=1)] * 40
    assert [hashlib.md5(b.encode()).hexdigest() for b in table.column("body").to_pylist()] == [
        hashlib.md5(_body(i, 1).encode()).hexdigest() for i in range(40)
    ]


def test_duckdb_read_batches_follow_the_row_width() -> None:
    con = duckdb.connect()
    narrow = con.sql("SELECT range AS id, range * 2 AS n, now() AS t FROM range(10)")
    text = con.sql("SELECT range AS id, 'x' AS s FROM range(10)")
    # Fixed widths are known: 3 columns of at most 16 bytes, in an eighth of 4 MiB.
    assert relation_batch_rows(narrow, 122_880, 4 * 2**20, None) == 4 * 2**20 // 8 // 48
    assert relation_batch_rows(narrow, 1000, 4 * 2**20, None) == 1000  # never above the row-group size
    # Variable widths take the inputs' width; without one, a DuckDB vector at a time.
    assert relation_batch_rows(text, 122_880, 4 * 2**20, 128 * 1024) == 4
    assert relation_batch_rows(text, 122_880, 4 * 2**20, 1_000_000) == 1
    assert relation_batch_rows(text, 122_880, 4 * 2**20, None) == DUCKDB_VECTOR_ROWS
    assert relation_batch_rows(text, 122_880, None, None) == 122_880  # no byte bound: rows only


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "by-partition"])
def test_a_range_split_of_wide_rows_bounds_each_partition_and_all_together(
    lake_root: LakeRoot, interleaved: bool
) -> None:
    """Ten partitions' documents, interleaved or one partition after another: each file's row
    groups stay under the bound, and interleaved, the buffers of all partitions together stay
    under two row groups' bytes (idle ones are written early)."""
    storage = LakeStorage(lake_root.sub("silver"), lake_root.azure)
    days = [f"2025-01-{d:02d}" for d in range(1, 11)]
    partitions = dg.DailyPartitionsDefinition(start_date="2025-01-01", end_date="2025-01-11")
    assigner = PartitionAssigner.for_partitions(partitions, days, "updated_at")
    schema = pa.schema([("doc_id", pa.int64()), ("updated_at", UTC_US), ("body", pa.string())])
    rows = 160  # 16 per partition, 64 KB each: 1 MiB per partition, 10 MiB in all

    def batches() -> Iterator[pa.RecordBatch]:
        for i in range(rows):
            day = i % 10 if interleaved else i // 16
            yield pa.record_batch(
                [pa.array([i]), pa.array([T0 + dt.timedelta(days=day)], UTC_US), pa.array(["y" * 65536])],
                schema=schema,
            )

    bound = 512 * 1024
    files = {day: f"split/{day}.parquet" for day in days}
    results = write_partitions(
        storage, files, pa.RecordBatchReader.from_batches(schema, batches()), assigner,
        row_group_size=100_000, row_group_bytes=bound,
    )  # fmt: skip
    assert [results[d].rows for d in days] == [16] * 10
    row_groups = 0
    for day in days:
        sizes = _row_group_bytes(storage, files[day])
        assert max(sizes) <= bound + 65536 + 1024, (day, sizes)
        row_groups += len(sizes)
    # Per partition alone, 1 MiB in 512 KB row groups is 2 row groups; interleaved, the shared
    # budget (two row groups' bytes across all ten partitions) writes idle partitions' buffers early.
    if interleaved:
        assert row_groups > 2 * len(days), row_groups
    else:
        assert row_groups == 2 * len(days), row_groups


def _bronze_of_notes(path: Path, rows: int) -> pa.Schema:
    """A bronze file of ``rows`` notes, two versions of every key: ~100 MB for DuckDB to rank."""
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("note_id", pa.int64()), ("updated_at", UTC_US), ("note", pa.string()), *LINEAGE_FIELDS]
    )
    ids = pa.array(range(rows), pa.int64())
    stamps = pa.array([T0] * rows, UTC_US)
    notes = pc.binary_join_element_wise(
        pa.array(["note-"] * rows), pc.cast(ids, pa.string()), "-" + "x" * 60, ""
    )
    table = pa.Table.from_arrays(
        [pc.divide(ids, 2), stamps, notes, pa.array(["run"] * rows), stamps, ids, pa.array([False] * rows)],
        schema=schema,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return schema


def test_duckdb_spills_to_the_configured_directory_from_an_unwritable_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A code server's working directory is not writable (the image's is root-owned; /proc here,
    which no user can write): a silver query larger than DuckDB's memory limit spills to the
    directory the settings name, so it runs instead of failing to create DuckDB's ``.tmp``."""
    spill = tmp_path / "spill"
    bronze = tmp_path / "lake" / "bronze"
    file = bronze / "notes" / "ingestion_date=2025-01-01" / "notes_run.parquet"
    schema = _bronze_of_notes(file, 600_000)
    settings = resolve_settings(
        {
            "DATALAKE_ROOT_BRONZE": str(bronze),
            "DATALAKE_ROOT_SILVER": str(tmp_path / "lake" / "silver"),
            "DATALAKE_ROOT_VANGUARD_WHOLESALE": str(tmp_path / "lake" / "vw"),
            "DATALAKE_DUCKDB_MEMORY_LIMIT": "32MB",
            "DATALAKE_DUCKDB_TEMP_DIRECTORY": str(spill),
        }
    )
    resources = build_resources(settings)
    duckdb_resource = resources["duckdb_resource"]
    assert isinstance(duckdb_resource, DuckDBResource)
    notes = TableSpec.model_validate(
        {
            "schema": "v3",
            "table": "notes",
            "primary_key": ["note_id"],
            "cursor": {"column": "updated_at", "kind": "timestamp"},
        }
    )
    monkeypatch.chdir("/proc")

    # The query does spill at this size: DuckDB's files are in the configured directory mid-read.
    con = duckdb_resource.connect()
    paths = ParquetPaths(dg.AssetKey(["bronze", "notes"]), (str(file),), schema)
    reader = current_state(paths.relation(con), notes).to_arrow_reader(100_000)
    first = reader.read_next_batch()
    assert any(name.startswith("duckdb_temp") for name in os.listdir(spill)), os.listdir(spill)
    assert first.num_rows + sum(b.num_rows for b in reader) == 300_000
    del reader
    con.close()

    # Through Dagster, as the code location wires it.
    result = dg.materialize(
        [dg.AssetSpec(["bronze", "notes"]), build_current_state_asset(notes)],
        resources=resources,
        selection=[dg.AssetKey(["silver", "notes_current"])],
    )
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["dagster/row_count"].value == 300_000

    # DuckDB's own default (.tmp in the working directory) fails here: the setting is what works.
    plain = duckdb.connect(config={"memory_limit": "32MB"})
    with pytest.raises(duckdb.IOException, match=r"\.tmp"):
        current_state(paths.relation(plain), notes).to_arrow_table()
