"""The merged datalake code location (see README.md)."""

from __future__ import annotations

import contextlib
import os
import sys


def _arrow_memory_pool() -> None:
    """Arrow allocations from jemalloc, unless the operator chose a pool (``ARROW_DEFAULT_MEMORY_POOL``).

    pyarrow's default pool on Linux is mimalloc, which keeps freed memory longer: a streamed
    bronze extraction peaked about 50 MB higher with it, at the same speed (``bench/`` extraction).
    Set before pyarrow is imported, the variable also reaches run worker processes; if pyarrow is
    already loaded, its default pool is switched instead.
    """
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"
    if "pyarrow" in sys.modules:
        import pyarrow as pa

        # A pyarrow build without jemalloc keeps its default.
        with contextlib.suppress(NotImplementedError):
            pa.set_memory_pool(pa.jemalloc_memory_pool())


_arrow_memory_pool()
