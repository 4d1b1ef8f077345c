"""The bronze readers' read-ahead: bounded memory when the writer is slower than the source.

connectorx cannot be paused (its reader thread feeds an unbounded channel) and its iterator holds
the GIL while it waits, so the Arrow reader is paced in the writer's thread (``Paced``): when the
source stays ahead, what it has decoded is drained and parked on local disk. The row reader's
source can be paused, so it reads ahead in a thread and waits (``prefetch``). These tests drive
both with sources much faster or slower than their consumers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute
import pytest

from datalake.extract import (
    CAUGHT_UP_SECONDS,
    SPILL_STALE_SECONDS,
    ExtractionStats,
    Paced,
    Spill,
    prefetch,
)

pc: Any = pyarrow.compute  # kernels generated at import; type checkers cannot see them
BATCHES = 40
ROWS = 50_000  # 400 kB of int64 per batch
DEPTH = 2


FIRST = pa.array(range(ROWS), pa.int64())


def _source(drained: list[float], delay: float = 0.0) -> Iterator[pa.RecordBatch]:
    """BATCHES batches, each made as it is pulled: at once (decoded ahead) unless ``delay``."""
    for i in range(BATCHES):
        if delay:
            time.sleep(delay)  # decoding: a pull has to wait
        yield pa.record_batch({"n": pc.add(FIRST, i * ROWS)})
    drained.append(time.monotonic())


def _spill_dirs(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.iterdir() if p.name.startswith("datalake-spill-")]


@pytest.mark.parametrize("step", [0.5, 0.02], ids=["one-long-stall", "every-step-slow"])
def test_a_slow_writer_has_the_source_drained_to_disk_and_memory_bounded(
    step: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer stalled once (an upload) or slower at every batch: the source is drained anyway."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where TMPDIR would point
    stats = ExtractionStats()
    drained: list[float] = []
    pool = pa.default_memory_pool()
    baseline = pool.bytes_allocated()  # whatever this process already holds
    seen: list[int] = []
    peak_in_memory = 0
    batch_bytes = ROWS * 8
    spilled_while_writing = 0
    for i, batch in enumerate(Paced(_source(drained), DEPTH, Spill(stats))):
        long_stall = step > CAUGHT_UP_SECONDS
        if i == 2 or not long_stall:
            time.sleep(step)  # the writer is busy; the source runs on meanwhile
        if i == 2 and long_stall:
            assert drained, "the source waited for the stalled writer"
            assert len(os.listdir(_spill_dirs(tmp_path)[0])) >= BATCHES - 3 - DEPTH
        spilled_while_writing = max(spilled_while_writing, stats.spilled_batches)
        peak_in_memory = max(peak_in_memory, pool.bytes_allocated() - baseline)
        seen.extend(batch.column("n").to_pylist()[:1])
        del batch
    # Every batch, in order, exactly once.
    assert seen == [i * ROWS for i in range(BATCHES)]
    # Memory: a handful of batches, never the whole stream (40 batches = 16 MB).
    assert peak_in_memory <= (DEPTH + 4) * batch_bytes, peak_in_memory
    assert spilled_while_writing >= BATCHES // 2
    assert stats.spilled_bytes >= stats.spilled_batches * batch_bytes
    assert not _spill_dirs(tmp_path), "spill left behind"


def test_a_writer_that_keeps_up_spills_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    stats = ExtractionStats()
    # The source is the slow side: every pull waits, so the reader is always caught up.
    total = sum(b.num_rows for b in Paced(_source([], delay=0.005), 4, Spill(stats)))
    assert total == BATCHES * ROWS
    assert stats.spilled_batches == 0 and list(tmp_path.iterdir()) == []


def test_the_source_is_read_in_the_writers_thread_while_it_keeps_up() -> None:
    """connectorx holds the GIL while it waits: no other thread may wait on it for the writer."""
    pulled_in: set[str] = set()

    def source() -> Iterator[pa.RecordBatch]:
        for batch in _source([], delay=0.002):
            pulled_in.add(threading.current_thread().name)
            yield batch

    assert sum(b.num_rows for b in Paced(source(), 4, Spill(ExtractionStats()))) == BATCHES * ROWS
    assert pulled_in == {threading.current_thread().name}


def test_an_error_in_the_source_surfaces_in_order_and_the_spill_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    stats = ExtractionStats()

    def failing() -> Iterator[pa.RecordBatch]:
        yield from list(_source([]))[:10]
        raise ConnectionError("lost connection to MySQL server during query")

    got = 0
    with pytest.raises(ConnectionError, match="lost connection"):
        for _ in Paced(failing(), DEPTH, Spill(stats)):
            if got == 0:
                time.sleep(0.3)  # the source is drained into the spill, up to its error
            got += 1
    assert got == 10 and stats.spilled_batches > 0
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_stops_early_closes_the_source_and_removes_the_spill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    closed: list[bool] = []

    def source() -> Iterator[pa.RecordBatch]:
        try:
            yield from _source([])
        finally:
            closed.append(True)

    stats = ExtractionStats()
    stream = iter(Paced(source(), DEPTH, Spill(stats)))
    next(stream)
    time.sleep(0.3)  # drained into the spill meanwhile
    assert stats.spilled_batches > 0
    stream.close()  # type: ignore[attr-defined]  # a generator
    assert closed == [True] and list(tmp_path.iterdir()) == []


def test_a_killed_runs_spill_is_swept_by_the_next_spill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL leaves a run's spill behind; the next extraction that spills removes it."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()  # its PID now names no process (and is not reused this quickly)
    old = time.time() - SPILL_STALE_SECONDS - 60

    def spill_dir(pid: int, suffix: str, mtime: float | None) -> Path:
        path = tmp_path / f"datalake-spill-{pid}-{suffix}"
        path.mkdir()
        (path / "000000000.arrow").write_bytes(b"x" * 1024)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    stale = spill_dir(killed.pid, "stale", old)
    recent = spill_dir(killed.pid, "recent", None)  # may still be in use by a PID namespace we cannot see
    live = spill_dir(os.getppid(), "live", old)  # its process runs
    other = tmp_path / "not-a-spill"
    other.mkdir()
    os.utime(other, (old, old))

    spill = Spill(ExtractionStats())
    spill.take(spill.put(pa.record_batch({"n": FIRST})))
    assert not stale.exists()
    assert recent.exists() and live.exists() and other.exists()
    assert len(_spill_dirs(tmp_path)) == 3  # this spill's own directory among them, until closed
    spill.close()
    assert sorted(_spill_dirs(tmp_path)) == sorted([recent, live])


def test_the_row_reader_waits_for_its_writer_and_surfaces_errors() -> None:
    """prefetch: at most ``depth`` batches ahead in memory; the source is paused, not spilled."""
    produced: list[int] = []

    def source() -> Iterator[pa.RecordBatch]:
        for i, batch in enumerate(_source([])):
            produced.append(i)
            yield batch
        raise ConnectionError("lost connection to MySQL server during query")

    stream = prefetch(source(), depth=DEPTH)
    first = next(stream)
    time.sleep(0.3)
    # The one handed over, DEPTH waiting in the queue, one held by the blocked reader.
    assert len(produced) <= DEPTH + 2
    seen = [first.column("n")[0].as_py()]
    with pytest.raises(ConnectionError, match="lost connection"):
        seen.extend(b.column("n")[0].as_py() for b in stream)
    assert seen == [i * ROWS for i in range(BATCHES)]


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
