"""One storage abstraction over a root URL: a local/NFS path or Azure Data Lake Storage.

A root is ``/abs/path`` (local disk or an NFS mount), ``abfs://container@account.dfs.core.windows.net/prefix``
or ``az://container/prefix`` (account from the credentials resource or its blob endpoint). Azure is
reached through the *blob* endpoint (adlfs for writes, listings and DuckDB; polars' native reader for
lazy scans), which every ADLS Gen2 account serves and the Azurite emulator implements — Dagster's
``ADLS2Resource`` hard-codes the dfs host, which Azurite lacks, so the same code path could not be
tested locally with it.

Visibility contract (DESIGN §3.4): a file appears atomically or not at all.
- local/NFS: written under a hidden in-progress name in the target directory, fsynced, then
  ``os.replace``d onto its final name (and the directory fsynced);
- Azure: written as staged blocks that become visible only when the block list is committed
  at close; a failed or killed write commits nothing (uncommitted blocks are invisible and the
  service discards them after a week).
Readers list only final names (``is_visible_name``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import io
import itertools
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, cast
from urllib.parse import urlparse

import dagster as dg
import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

INPROGRESS_MARKER = ".inprogress-"
# Staged-block size for Azure writes. adlfs' default (50 MiB) is held in memory per open file; a
# range backfill keeps one file open per partition, so smaller blocks bound its memory.
AZURE_BLOCK_SIZE = 8 * 2**20
# The same for each file of a range split, which keeps every partition's file open until the end
# (a year's backfill: 365 x 8 MiB). 1 MiB blocks still allow 48 GiB per file (50,000 blocks).
SPLIT_AZURE_BLOCK_SIZE = 2**20
_AZURE_SCHEMES = ("abfs", "abfss", "az")
# A local temp file is named after its writer: host, PID namespace, PID and the process's start
# time. The next write into the directory removes leftovers of writers that are gone: at once when
# the writer ran in this host's PID namespace and that process (same PID, same start: PIDs are
# reused) has ended; otherwise (another pod on a shared NFS, a container with its own PIDs) only
# once untouched this long, since a live writer may keep a file open and idle for hours (a range
# backfill's early partitions).
STALE_INPROGRESS_SECONDS = 24 * 3600
_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"
# .<file>.inprogress-<host>-<pid namespace>-<pid>-<start>-<32 hex>
_OWNED_TEMP = re.compile(
    rf"{re.escape(INPROGRESS_MARKER)}(?P<host>[A-Za-z0-9.-]+)-(?P<ns>\d+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{{32}}$"
)


def _pid_namespace() -> int:
    """This process's PID namespace (0 where the platform does not say, e.g. macOS)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc), None if it is not running; 0 where the
    platform has no /proc (then PIDs are compared alone)."""
    if not os.path.isdir("/proc/self"):
        return 0 if _pid_running(pid) else None
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])  # field 22 of stat(5); the first two (pid, comm) are before ')'


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _writer_tag() -> str:
    pid = os.getpid()
    return f"{_HOST}-{_pid_namespace()}-{pid}-{_process_start(pid) or 0}"


def is_visible_name(name: str) -> bool:
    """Readers ignore hidden and in-progress names, in any path segment (temp dirs included)."""
    return not any(
        segment.startswith(".") or INPROGRESS_MARKER in segment for segment in name.split("/") if segment
    )


class AzureAccess(dg.ConfigurableResource):
    """How Azure roots are reached: the type the IO managers' ``azure`` field takes.

    The implementation, with dagster-azure's credential types, is ``datalake.azure.AzureBlobResource``.
    It lives in its own module so that a process whose roots are all local or NFS never imports the
    Azure SDK (about 40 MB of memory and half a second per process, code server and every run).
    """

    def filesystem(self, root_account: str | None = None) -> fsspec.AbstractFileSystem:
        raise NotImplementedError

    def scan_filesystem(self, root_account: str | None = None) -> fsspec.AbstractFileSystem:
        """What DuckDB reads the account's files through (read-only); the filesystem unless overridden."""
        return self.filesystem(root_account)

    def polars_storage_options(self, root_account: str | None = None) -> dict[str, str]:
        raise NotImplementedError


class _ReadOnly(fsspec.AbstractFileSystem):
    """An fsspec filesystem that only opens files for reading (what DuckDB calls to scan them)."""

    cachable = False  # one per wrapped filesystem; fsspec's instance cache would tokenize it

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if mode != "rb":
            raise PermissionError(f"{path}: read-only")
        return self._open_read(path, block_size=block_size, cache_options=cache_options, **kwargs)

    def _open_read(self, path: str, **kwargs: Any) -> Any:
        raise NotImplementedError


class ArrowReads(_ReadOnly):
    """A read-only fsspec view of a pyarrow filesystem (``container/path`` on an Azure account).

    What DuckDB scans Azure files through. Each of DuckDB's reads is one positional read in
    Arrow's C++ Azure client, which releases the GIL while it waits, so DuckDB's threads fetch in
    parallel; a request through adlfs instead runs the Azure Python SDK's pipeline under the GIL.
    The lake benchmark's partner slice over 30 bronze files on Azurite: 0.84 s vs 1.93 s.
    """

    def __init__(self, fs: pafs.FileSystem, secrets: tuple[str, ...] = ()):
        super().__init__()
        self.fs = fs
        self._secrets = tuple(s for s in secrets if s)

    def _open_read(self, path: str, **kwargs: Any) -> Any:
        # its read_at is thread-safe: one ranged GET each
        native = redacted(self.fs.open_input_file, self._secrets)(path)
        return _PositionalFile(native.size(), redacted(native.read_at, self._secrets), native.close)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        entry = redacted(self.fs.get_file_info, self._secrets)(path)
        if entry.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        kind = "directory" if entry.type == pafs.FileType.Directory else "file"
        return {"name": path, "size": entry.size, "type": kind, "mtime": entry.mtime}

    def modified(self, path: str) -> Any:
        return self.info(path)["mtime"]

    def exists(self, path: str, **kwargs: Any) -> bool:
        return redacted(self.fs.get_file_info, self._secrets)(path).type != pafs.FileType.NotFound


# A URL's query: where Arrow's Azure client puts a SAS token (``sig=…``) in the URLs of its errors.
_URL_QUERY = re.compile(r"\?[^\s'\"<>]*")


def redacted(call: Callable[..., Any], secrets: tuple[str, ...] = ()) -> Callable[..., Any]:
    """``call`` whose errors carry no URL query and none of ``secrets``: Arrow's Azure client puts
    the container URL with its SAS into its error text, which DuckDB and Dagster would pass on to
    the run's failure event, the UI and the event log."""

    def clean(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            text = str(exc)
            safe = _URL_QUERY.sub("?<redacted>", text)
            for secret in secrets:
                safe = safe.replace(secret, "<redacted>")
            if safe == text:
                raise
            try:
                replacement = type(exc)(safe)
            except Exception:
                replacement = OSError(safe)
            raise replacement from None

    return clean


class _PositionalFile(io.RawIOBase):
    """A file read by position (``read_at(size, offset)``, one request each): what DuckDB scans.

    DuckDB reads a file through one handle from several threads at once (its positional reads
    assume ``pread``), and its Python bridge makes each one ``seek(offset)`` then ``read(size)``.
    The interpreter may switch threads between the two, so a position shared by all threads let
    one thread's read start at another's offset: a silently wrong sum, seen on Azurite with a
    short switch interval. So a thread's seek is kept for that thread's next read; a read with no
    seek of its own continues from where the last read ended.
    """

    def __init__(
        self, size: int, read_at: Callable[[int, int], bytes], close: Callable[[], None] | None = None
    ):
        super().__init__()
        self._size = size
        self._read_at = read_at
        self._close = close
        self._position = 0  # where the last read ended
        self._sought: dict[int, int] = {}  # thread → the offset of its seek not yet read from

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, size: int, offset: int) -> bytes:
        """``size`` bytes from ``offset`` (fewer at the end of the file), leaving positions alone."""
        return self._read_at(max(0, min(size, self._size - offset)), offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._sought.get(threading.get_ident(), self._position)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self.tell() + offset
        elif whence == io.SEEK_END:
            position = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence!r}")
        self._sought[threading.get_ident()] = position
        return position

    def read(self, size: int | None = -1) -> bytes:
        position = self._sought.pop(threading.get_ident(), self._position)
        wanted = self._size - position if size is None or size < 0 else size
        wanted = max(0, min(wanted, self._size - position))
        data = self._read_at(wanted, position) if wanted else b""
        self._position = position + len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed and self._close is not None:
            self._close()
        super().close()


@dataclass(frozen=True)
class ListedFile:
    """A file as a listing reported it."""

    size: int
    modified: float  # POSIX timestamp

    def info(self, name: str) -> dict[str, Any]:
        mtime = dt.datetime.fromtimestamp(self.modified, tz=dt.UTC)
        return {"name": name, "size": self.size, "type": "file", "mtime": mtime}


# Bytes kept from the end of each file: its Parquet footer, and at least what DuckDB reads to get
# it (the last 16 KiB, then the rest of a longer footer): one request for most files.
FOOTER_PREFETCH_BYTES = 16 * 1024
# What one input's prefetched footers may hold: 8,192 files of footers up to 16 KiB (the files
# beyond it are read by DuckDB itself).
FOOTER_PREFETCH_BUDGET_BYTES = 128 * 1024 * 1024
# Footers fetched at once for one input (each thread waits on one request at a time).
FOOTER_PREFETCH_THREADS = 16
_PARQUET_MAGIC = b"PAR1"
# Numbers the aliases: each input's files are read on a connection under a protocol of its own.
_ALIAS_NUMBERS = itertools.count(1)


class ProtocolAlias(_ReadOnly):
    """A filesystem under a protocol of its own: ``<protocol>://container/path`` is
    ``container/path`` on ``fs``. Read-only: what DuckDB calls to scan files.

    DuckDB picks a registered fsspec filesystem by a path's protocol alone, and every adlfs
    filesystem is ``abfs``: one connection reading roots on two storage accounts would read both
    through whichever was registered first. An alias per filesystem keeps them apart.

    Files are read by position, each read one ranged request (``cat_file``) and no read-ahead:
    DuckDB reads the byte ranges it needs (footers, the column chunks of a projection) and buffers
    them itself. adlfs' own files fetch a whole block (8 MB here) from each read's offset, i.e. to
    the end of a smaller file for every column chunk: a partner slice over 30 bronze files on
    Azurite transferred 886 MB for the 53 MB it needed, and took twice as long.

    For the files in ``listed`` (what the input's listing reported) it answers DuckDB's questions
    (exists, size, modification time; ~7 of them per file in a scan, each a request to Azure) from
    the listing, and opens a file only when DuckDB reads beyond its footer. ``prefetch_footers``
    fetches the footers of all of them at once, on several threads: DuckDB reads the footers of a
    ``union_by_name`` scan one after the other while binding it, one round trip each (a thousand
    bronze files on a storage account took tens of seconds before the first row was read).
    """

    def __init__(
        self, fs: fsspec.AbstractFileSystem, protocol: str, listed: Mapping[str, ListedFile] | None = None
    ):
        super().__init__()
        self.fs = fs
        self.protocol = (protocol,)  # what DuckDB routes by; ``inner`` strips it for ``fs``
        self._prefix = f"{protocol}://"
        # By path on ``fs`` (``container/path``), as ``inner`` gives it.
        self._listed = {self.inner(_without_scheme(p)): f for p, f in (listed or {}).items()}
        self._footers: dict[str, bytes] = {}  # path → the file's last bytes, its footer among them

    def inner(self, path: str) -> str:
        return path[len(self._prefix) :] if path.startswith(self._prefix) else path

    def prefetch_footers(self, threads: int, budget_bytes: int = FOOTER_PREFETCH_BUDGET_BYTES) -> None:
        """Reads the footer of each listed file, ``threads`` at a time, while they hold less than
        ``budget_bytes`` (the files beyond it DuckDB reads itself, as any unlisted file). A file that
        cannot be read now is left to DuckDB, which reports it as it does any other, naming it."""
        lock = threading.Lock()
        held = self.prefetched_bytes

        def fetch(path: str) -> None:
            nonlocal held
            with lock:
                if held >= budget_bytes:
                    return
            try:
                data = self._read_footer(path, self._listed[path].size)
            except Exception:  # adlfs raises more than OSError (ValueError, the SDK's own errors)
                return
            if data is None:
                return
            with lock:
                if held + len(data) <= budget_bytes:
                    self._footers[path] = data
                    held += len(data)
                else:
                    held = budget_bytes  # full: no more fetched

        pending = [path for path in self._listed if path not in self._footers]
        if not pending:
            return
        with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(pending)))) as pool:
            list(pool.map(fetch, pending))

    @property
    def prefetched_bytes(self) -> int:
        return sum(len(footer) for footer in self._footers.values())

    def footer(self, path: str) -> tuple[pa.Schema, pq.FileMetaData] | None:
        """The Arrow schema and footer of a file whose footer was prefetched (``path`` as listed)."""
        tail = self._footers.get(self.inner(_without_scheme(path)))
        if not tail:
            return None
        parquet = pq.ParquetFile(pa.BufferReader(tail))  # a footer's offsets count from the end
        return parquet.schema_arrow, parquet.metadata

    def _read_footer(self, path: str, size: int) -> bytes | None:
        if size < 12:  # not a Parquet file (magic, footer length, magic): DuckDB says so
            return None
        handle = self._open_uncached(path)
        try:
            if handle.size != size:
                return None  # changed since it was listed: DuckDB's own reads will say so
            tail = handle.read_at(min(size, FOOTER_PREFETCH_BYTES), size - min(size, FOOTER_PREFETCH_BYTES))
            if len(tail) < 8 or tail[-4:] != _PARQUET_MAGIC:
                return None
            wanted = int.from_bytes(tail[-8:-4], "little") + 8
            if wanted > size:
                return None
            if wanted > len(tail):
                tail = handle.read_at(wanted - len(tail), size - wanted) + tail
            return tail
        finally:
            handle.close()

    def _open_read(self, path: str, **kwargs: Any) -> Any:
        inner = self.inner(path)
        listed = self._listed.get(inner)
        if listed is None:
            return self._open_uncached(inner, **kwargs)
        return _ListedFileHandle(
            inner, listed.size, self._footers.get(inner, b""), lambda: self._open_uncached(inner, **kwargs)
        )

    def _open_uncached(self, inner: str, **kwargs: Any) -> _PositionalFile:
        if isinstance(self.fs, _ReadOnly):  # opens files for DuckDB itself (ArrowReads)
            return cast(_PositionalFile, self.fs._open_read(inner, **kwargs))

        def read_at(size: int, offset: int) -> bytes:
            return cast(bytes, self.fs.cat_file(inner, start=offset, end=offset + size))

        return _PositionalFile(int(self.fs.info(inner)["size"]), read_at)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        listed = self._listed.get(self.inner(path))
        return listed.info(path) if listed is not None else self.fs.info(self.inner(path), **kwargs)

    def modified(self, path: str) -> Any:
        listed = self._listed.get(self.inner(path))
        return listed.info(path)["mtime"] if listed is not None else self.fs.modified(self.inner(path))

    def exists(self, path: str, **kwargs: Any) -> bool:
        return self.inner(path) in self._listed or self.fs.exists(self.inner(path), **kwargs)


def _without_scheme(path: str) -> str:
    return path.split("://", 1)[1] if "://" in path else path


class _ListedFileHandle(_PositionalFile):
    """A listed file, read from its prefetched footer where that holds the bytes asked for, and
    opened on ``fs`` at the first read beyond it."""

    def __init__(self, path: str, size: int, footer: bytes, open_remote: Callable[[], _PositionalFile]):
        super().__init__(size, self._read_listed)
        self._path = path
        self._footer = footer
        self._footer_start = size - len(footer)
        self._open_remote = open_remote
        self._remote: _PositionalFile | None = None
        self._lock = threading.Lock()

    def _read_listed(self, size: int, offset: int) -> bytes:
        if self._footer and offset >= self._footer_start:
            start = offset - self._footer_start
            return self._footer[start : start + size]
        with self._lock:
            if self._remote is None:
                remote = self._open_remote()
                if remote.size != self.size:
                    remote.close()
                    raise OSError(
                        f"{self._path} changed while it was being read ({self.size} bytes when listed, "
                        f"{remote.size} now); run the step again"
                    )
                self._remote = remote
        return self._remote.read_at(size, offset)

    def close(self) -> None:
        if not self.closed and self._remote is not None:
            self._remote.close()
        super().close()


@dataclass(frozen=True)
class StorageRoot:
    """A parsed root URL."""

    url: str
    scheme: str  # "file" or "abfs"
    base: str  # path inside the filesystem: absolute local path, or "container/prefix"
    account: str | None = None

    @property
    def is_azure(self) -> bool:
        return self.scheme == "abfs"


# Azure's rule: 3-63 lowercase letters, digits and single hyphens, starting and ending alphanumeric.
_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")


def parse_root(url: str) -> StorageRoot:
    parsed = urlparse(url)
    if parsed.query or parsed.fragment or "?" in url or "#" in url:
        # Not echoed whole: a query here is most likely a SAS token.
        shown = re.split(r"[?#]", url, maxsplit=1)[0]
        raise ValueError(
            f"storage root {shown!r} has a query or fragment: give Azure credentials through the Azure "
            "resource (DATALAKE_AZURE_SAS_TOKEN, ...), not in the URL, which is recorded as dagster/uri"
        )
    if any(c in url for c in "[]*"):
        # polars and DuckDB expand glob patterns in the paths they are given: files written under
        # such a root could not be read back.
        raise ValueError(f"storage root {url!r} contains a glob character ([, ] or *)")
    if parsed.scheme in _AZURE_SCHEMES:
        container, _, account_host = parsed.netloc.partition("@")
        if not container:
            raise ValueError(f"Azure root {url!r} names no container")
        if not _CONTAINER.match(container):
            raise ValueError(
                f"Azure root {url!r}: {container!r} is not a container name (3-63 lowercase letters, "
                "digits, hyphens); the form is abfs://<container>@<account>.dfs.core.windows.net/<path>"
            )
        account = account_host.split(".")[0] if account_host else None
        segments = parsed.path.strip("/").split("/") if parsed.path.strip("/") else []
        if any(s in ("", ".", "..") for s in segments):
            # Blob names keep them literally: '//' was written, then refused by polars' reader;
            # '.' and '..' failed the first write with an authentication error.
            raise ValueError(f"Azure root {url!r} has an empty, '.' or '..' path segment")
        base = posixpath.join(container, *segments)
        return StorageRoot(url=url.rstrip("/"), scheme="abfs", base=base, account=account)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        return StorageRoot(url=os.path.abspath(path), scheme="file", base=os.path.abspath(path))
    raise ValueError(f"unsupported storage root {url!r}: use a path, abfs://container@account/... or az://")


class LakeStorage:
    """Files under one root. Paths given to it are relative to the root, with '/' separators."""

    def __init__(self, root: str, azure: AzureAccess | None = None):
        self.root = parse_root(root)
        self._azure = azure
        # Modification times and sizes the last listing returned (no request per file on Azure).
        self._listed_mtimes: dict[str, float] = {}
        self._listed_sizes: dict[str, int] = {}
        if self.root.is_azure:
            self.fs: fsspec.AbstractFileSystem = self.azure.filesystem(self.root.account)
        else:
            self.fs = LocalFileSystem()

    @property
    def scan_fs(self) -> fsspec.AbstractFileSystem | None:
        """What DuckDB reads this root's files through; None for a local root (DuckDB opens paths)."""
        return self.azure.scan_filesystem(self.root.account) if self.root.is_azure else None

    @property
    def azure(self) -> AzureAccess:
        """The Azure access given, else DefaultAzureCredential (managed identity, az login …)."""
        if self._azure is None:
            from datalake.azure import AzureBlobResource

            self._azure = AzureBlobResource()
        return self._azure

    # --- naming ---------------------------------------------------------------
    def path(self, relative: str) -> str:
        """Path inside the filesystem (what fsspec and pyarrow take)."""
        return posixpath.join(self.root.base, relative) if relative else self.root.base

    def uri(self, relative: str) -> str:
        """The URL recorded in metadata: the root as configured, plus the relative path."""
        if self.root.is_azure:
            return f"{self.root.url}/{relative}" if relative else self.root.url
        return self.path(relative)

    def reader_path(self, relative: str) -> str:
        """What a DuckDB connection with ``fs`` registered (Azure) — or any local reader — opens."""
        if self.root.is_azure:
            return f"abfs://{self.path(relative)}"
        return self.path(relative)

    def polars_source(self, relative: str) -> tuple[str, dict[str, str] | None]:
        """Path and ``storage_options`` for ``pl.scan_parquet``/``read_parquet`` (native, lazy on Azure)."""
        if self.root.is_azure:
            return f"abfs://{self.path(relative)}", self.azure.polars_storage_options(self.root.account)
        return self.path(relative), None

    # --- reading --------------------------------------------------------------
    def list_files(self, prefix: str, suffix: str = ".parquet") -> list[str]:
        """Relative paths of visible files under ``prefix`` (recursive), sorted."""
        base = self.path(prefix)
        # A filesystem that caches listings may have cached this one before another process
        # committed files (the lake's Azure filesystems are made without that cache).
        self.fs.invalidate_cache()
        try:
            found = cast(dict[str, dict[str, Any]], self.fs.find(base, detail=True))
        except FileNotFoundError:
            return []
        out: list[str] = []
        root = self.root.base.rstrip("/") + "/"
        for full, info in found.items():
            full = str(full)
            relative = full[len(root) :] if full.startswith(root) else full
            if relative.endswith(suffix) and is_visible_name(relative):
                out.append(relative)
                stamp = _timestamp(info.get("mtime", info.get("last_modified")))
                if stamp is not None:
                    self._listed_mtimes[relative] = stamp
                if info.get("size") is not None:
                    self._listed_sizes[relative] = int(info["size"])
        return sorted(out)

    def listed(self, relatives: Iterable[str]) -> dict[str, ListedFile]:
        """What the last listing said of each file on Azure, by reader path (``reader_path``):
        a DuckDB scan of them asks for no size or modification time (see ``ProtocolAlias``).
        Empty for local and NFS roots, where asking costs no request."""
        if not self.root.is_azure:
            return {}
        found: dict[str, ListedFile] = {}
        for relative in relatives:
            size, stamp = self._listed_sizes.get(relative), self._listed_mtimes.get(relative)
            if size is not None and stamp is not None:
                found[self.reader_path(relative)] = ListedFile(size, stamp)
        return found

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.path(relative)))

    def modified(self, relative: str) -> float:
        """When the file was last written, as a POSIX timestamp (from the last listing, if it had it)."""
        listed = self._listed_mtimes.get(relative)
        if listed is not None:
            return listed
        stamp = _timestamp(self.fs.modified(self.path(relative)))
        assert stamp is not None
        return stamp

    def size(self, relative: str) -> int:
        return int(self.fs.size(self.path(relative)) or 0)

    def open_read(self, relative: str) -> IO[bytes]:
        return cast(IO[bytes], self.fs.open(self.path(relative), "rb"))

    def read_metadata(self, relative: str) -> pq.FileMetaData:
        """The Parquet footer (rows, row groups, schema) — one ranged read on Azure."""
        with self.open_read(relative) as handle:
            return pq.read_metadata(handle)

    def read_footer(
        self, relative: str, footers: ProtocolAlias | None = None
    ) -> tuple[pa.Schema, pq.FileMetaData]:
        """The Arrow schema and the Parquet footer: from ``footers`` where it holds the file's,
        else from one read of the file's end."""
        found = footers.footer(self.reader_path(relative)) if footers is not None else None
        if found is not None:
            return found
        with self.open_read(relative) as handle:
            parquet = pq.ParquetFile(handle)
            return parquet.schema_arrow, parquet.metadata

    def read_schema(self, relative: str) -> pa.Schema:
        return self.read_footer(relative)[0]

    def footers(self, relatives: Sequence[str]) -> ProtocolAlias | None:
        """On Azure, what DuckDB reads ``relatives`` through, their footers fetched at once
        (``ProtocolAlias``; it answers from the last listing). None for local and NFS roots."""
        if not self.root.is_azure or not relatives:
            return None
        fs = self.scan_fs
        assert fs is not None
        alias = ProtocolAlias(fs, f"datalake{next(_ALIAS_NUMBERS):x}", self.listed(relatives))
        alias.prefetch_footers(FOOTER_PREFETCH_THREADS)
        return alias

    def read_schemas(
        self, relatives: Sequence[str], footers: ProtocolAlias | None = None
    ) -> dict[str, pa.Schema]:
        """Each file's Arrow schema: from ``footers`` where it holds the file's, else read."""
        return {relative: self.read_footer(relative, footers)[0] for relative in relatives}

    def delete(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(relative))

    # --- writing --------------------------------------------------------------
    @contextlib.contextmanager
    def atomic_writer(
        self, relative: str, azure_block_size: int = AZURE_BLOCK_SIZE, group: AtomicGroup | None = None
    ) -> Iterator[IO[bytes]]:
        """A binary file that becomes visible under ``relative`` only if the block exits cleanly.

        An existing file of that name (a retry of the same run) stays readable until replaced. On
        Azure up to ``azure_block_size`` bytes are held in memory before they are staged. In a
        ``group`` (see ``atomic_group``) it becomes visible with the group's other files.
        """
        with self._atomic(relative, azure_block_size, lambda temp: open(temp, "wb"), group) as handle:
            yield handle

    @contextlib.contextmanager
    def atomic_arrow_writer(
        self, relative: str, azure_block_size: int = AZURE_BLOCK_SIZE, group: AtomicGroup | None = None
    ) -> Iterator[pa.NativeFile | IO[bytes]]:
        """``atomic_writer`` for Arrow's writers: on local disk and NFS, Arrow's own file.

        Arrow writes to a Python file through Python, taking the GIL for every write: a Parquet
        writer then waits for whichever thread holds it (in a bronze extraction, the one reading
        ahead from the source). To ``pa.OSFile`` it writes without it: a 2M-row extraction in the
        benchmark took ~4% less wall time.
        """
        with self._atomic(relative, azure_block_size, lambda temp: pa.OSFile(temp, "wb"), group) as handle:
            yield handle

    @contextlib.contextmanager
    def atomic_group(self) -> Iterator[AtomicGroup]:
        """Files written in the block become visible together once it exits cleanly; none otherwise.

        Each file of the group is first written completely: locally flushed, fsynced and closed
        under its hidden in-progress name; on Azure every block but the last staged. Only when the
        block exits cleanly are they published, one after the other (renamed; the last block
        uploaded and the block list committed). A failure while writing any of them (a full disk,
        a lost connection) publishes none; what remains possible is a failure among the
        publishing steps themselves, after the data of every file is written.
        """
        group = AtomicGroup()
        try:
            yield group
        except BaseException:
            group.discard()
            raise
        group.publish()

    @contextlib.contextmanager
    def _atomic(
        self,
        relative: str,
        azure_block_size: int,
        open_local: Callable[[str], Any],
        group: AtomicGroup | None,
    ) -> Iterator[Any]:
        final = self.path(relative)
        if not self.root.is_azure:
            directory = os.path.dirname(final)
            os.makedirs(directory, exist_ok=True)
            _remove_stale(directory)
            temp = os.path.join(
                directory,
                f".{os.path.basename(final)}{INPROGRESS_MARKER}{_writer_tag()}-{uuid.uuid4().hex}",
            )

            def remove() -> None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(temp)

            def publish() -> None:
                os.replace(temp, final)
                _fsync_dir(directory)

            try:
                with open_local(temp) as handle:
                    yield handle
                    handle.flush()
                    os.fsync(handle.fileno())
                if group is None:
                    publish()
            except BaseException:
                remove()
                raise
            if group is not None:
                group.staged.append((publish, remove))
            return
        # Azure: blocks are staged as they are written and committed by close(); on failure we
        # drop the handle instead of closing it, so no blob (or a previous version) changes.
        handle: Any = self.fs.open(final, "wb", block_size=azure_block_size)

        def drop() -> None:
            with contextlib.suppress(Exception):
                handle.discard()
            # closed=True so garbage collection (fsspec's __del__ closes open files) does not commit it.
            handle.closed = True

        try:
            yield handle
        except BaseException:
            drop()
            raise
        if group is None:
            handle.close()
        else:
            group.staged.append((handle.close, drop))


@dataclass
class AtomicGroup:
    """The files of one ``LakeStorage.atomic_group`` block: each one's publish and discard steps."""

    staged: list[tuple[Callable[[], None], Callable[[], None]]] = field(default_factory=list)

    def publish(self) -> None:
        for i, (publish, _discard) in enumerate(self.staged):
            try:
                publish()
            except BaseException:
                for _publish, discard in self.staged[i:]:
                    discard()
                raise

    def discard(self) -> None:
        for _publish, discard in self.staged:
            discard()


def _timestamp(value: Any) -> float | None:
    """A POSIX timestamp from what filesystems report (float seconds, or a datetime)."""
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def _remove_stale(directory: str) -> None:
    """Removes the temp files in ``directory`` whose writers are gone (see STALE_INPROGRESS_SECONDS):
    a killed write's leftover goes with the next write into its directory, whatever file it was."""
    now, namespace = time.time(), _pid_namespace()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if not entry.name.startswith(".") or INPROGRESS_MARKER not in entry.name:
                continue
            owner = _OWNED_TEMP.search(entry.name)
            with contextlib.suppress(OSError):
                if owner and owner["host"] == _HOST and int(owner["ns"]) == namespace:
                    gone = _process_start(int(owner["pid"])) != int(owner["start"])
                else:  # another host's or PID namespace's, or named before writers were
                    gone = now - entry.stat().st_mtime > STALE_INPROGRESS_SECONDS
                if gone:
                    os.remove(entry.path)


def _fsync_dir(directory: str) -> None:
    # Makes the rename durable on local disks and NFS; some filesystems refuse, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# '|' joins a multi-partition key's dimensions; inner spaces appear in static keys. Never a path
# or glob character (/ \\ * ? [ ] { }), nor % or # (URL escapes and fragments on Azure).
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_.=@:+|-]([A-Za-z0-9_.=@:+| -]*[A-Za-z0-9_.=@:+|-])?$")


def safe_segment(value: str) -> str:
    """Validates a path segment built from a key (partition key, table, run id)."""
    if not _SAFE_SEGMENT.fullmatch(value) or value in (".", "..") or value.startswith("."):
        raise ValueError(
            f"unsafe path segment {value!r}: a partition key or name may hold letters, digits, "
            "spaces inside, and _ . = @ : + | - (it names a file)"
        )
    return value
