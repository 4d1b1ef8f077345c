"""The bronze reader's read-ahead: bounded memory when the writer is slower than the source.

connectorx cannot be paused (its reader thread feeds an unbounded channel), so the extraction
drains it at the source's pace and parks what the writer is not ready for on local disk. These
tests drive ``prefetch`` with a source that is much faster than its consumer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from datalake.extract import ExtractionStats, Spill, prefetch

BATCHES = 40
ROWS = 50_000  # 400 kB of int64 per batch


def _source(drained: list[float]) -> Iterator[pa.RecordBatch]:
    for i in range(BATCHES):
        yield pa.record_batch({"n": pa.array(range(i * ROWS, (i + 1) * ROWS), pa.int64())})
    drained.append(time.monotonic())


def test_a_slow_writer_spills_to_disk_and_keeps_memory_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where TMPDIR would point
    stats = ExtractionStats()
    spill = Spill(stats)
    drained: list[float] = []
    pool = pa.default_memory_pool()
    baseline = pool.bytes_allocated()  # whatever this process already holds
    seen: list[int] = []
    peak_in_memory = 0
    batch_bytes = ROWS * 8
    for i, batch in enumerate(prefetch(_source(drained), depth=2, spill=spill)):
        if i == 2:
            time.sleep(0.5)  # the writer stalls: the source runs on to its end meanwhile
            assert drained, "the source was paused by the slow writer"
            spill_dirs = [p for p in tmp_path.iterdir() if p.name.startswith("datalake-spill-")]
            assert len(spill_dirs) == 1 and len(os.listdir(spill_dirs[0])) >= BATCHES - 6
        peak_in_memory = max(peak_in_memory, pool.bytes_allocated() - baseline)
        seen.extend(batch.column("n").to_pylist()[:1])
        del batch
    # Every batch, in order, exactly once.
    assert seen == [i * ROWS for i in range(BATCHES)]
    # Memory: a handful of batches, never the whole stream (40 batches = 16 MB).
    assert peak_in_memory <= 8 * batch_bytes, peak_in_memory
    assert stats.spilled_batches >= BATCHES - 6 and stats.spilled_bytes >= stats.spilled_batches * batch_bytes
    assert not any(p.name.startswith("datalake-spill-") for p in tmp_path.iterdir()), "spill left behind"


def test_a_writer_that_keeps_up_spills_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    stats = ExtractionStats()
    slow: list[float] = []

    def slow_source() -> Iterator[pa.RecordBatch]:
        for batch in _source(slow):
            time.sleep(0.005)  # the source is the slow side
            yield batch

    total = sum(b.num_rows for b in prefetch(slow_source(), depth=4, spill=Spill(stats)))
    assert total == BATCHES * ROWS
    assert stats.spilled_batches == 0 and list(tmp_path.iterdir()) == []


def test_an_error_in_the_source_surfaces_and_the_spill_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    stats = ExtractionStats()

    def failing() -> Iterator[pa.RecordBatch]:
        yield from list(_source([]))[:10]
        raise ConnectionError("lost connection to MySQL server during query")

    got = 0
    try:
        for _ in prefetch(failing(), depth=2, spill=Spill(stats)):
            if got == 0:
                time.sleep(0.3)  # let the source run ahead into the spill before the error
            got += 1
    except ConnectionError as exc:
        assert "lost connection" in str(exc)
    else:
        raise AssertionError("the source's error did not reach the writer")
    assert got == 10 and stats.spilled_batches > 0
    assert list(tmp_path.iterdir()) == []


_NO_PANDAS_PROBE = """
import datetime as dt, sys
import pyarrow as pa
from datalake.extract import ROW_SEQ_COLUMN, Lineage, UTC_TS

tried = []
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "pandas":
            tried.append(name)
        return None
sys.meta_path.insert(0, Finder())
schema = pa.schema([("id", pa.int64()), ("_datalake_run_id", pa.string()), ("_datalake_extracted_at", UTC_TS),
                    (ROW_SEQ_COLUMN, pa.int64()), ("_datalake_deleted", pa.bool_())])
lineage = Lineage("0f2c6c1e-run", dt.datetime(2026, 11, 21, 8, 0, 0, 250, tzinfo=dt.UTC), rows=4)
ids = pa.Array.from_buffers(pa.int64(), 3, [None, pa.py_buffer(bytes(24))])
first, second = lineage.attach(schema, [ids], 0), lineage.attach(schema, [ids], 3)
assert not tried, "pyarrow tried to import pandas"
row = first.to_pylist()[2]
print(row["_datalake_run_id"], row["_datalake_extracted_at"].isoformat(), row[ROW_SEQ_COLUMN],
      row["_datalake_deleted"], second.column(ROW_SEQ_COLUMN).to_pylist())
"""


def test_lineage_columns_convert_no_python_values() -> None:
    """pyarrow imports pandas on its first Python-value conversion wherever pandas is installed
    (~1 s and ~60 MB in a bronze run): the lineage columns are built from raw buffers instead."""
    probe = subprocess.run(
        [sys.executable, "-c", _NO_PANDAS_PROBE], capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, probe.stderr
    assert (
        probe.stdout.strip().splitlines()[-1]
        == "0f2c6c1e-run 2026-11-21T08:00:00.000250+00:00 2 False [3, 4, 5]"
    )
