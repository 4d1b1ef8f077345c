"""The bronze reader's read-ahead: bounded memory when the writer is slower than the source.

connectorx cannot be paused (its reader thread feeds an unbounded channel), so the extraction
drains it at the source's pace and parks what the writer is not ready for on local disk. These
tests drive ``prefetch`` with a source that is much faster than its consumer.
"""

from __future__ import annotations

import os
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
