"""The merged datalake code location (see README.md)."""

from __future__ import annotations

import contextlib
import ctypes
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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 64 * 1024


def _glibc_malloc() -> None:
    """Large native allocations get their own pages and go back to the OS when freed.

    connectorx (Rust) allocates every batch's column buffers with the C allocator. glibc's
    default raises its mmap threshold as large blocks are freed, so later batches land in the
    heap and their freed pages stay in the process: a fixed threshold (64 KiB) and trimming the
    heap top lowered a 2M-row extraction's peak RSS by ~16 MB at the same speed (``bench/``).
    An operator's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` wins; nothing is
    done on a C library without ``mallopt`` (musl, macOS).
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, 0)


_arrow_memory_pool()
_glibc_malloc()
