"""The storage abstraction on local disk and on Azurite: roots, atomic visibility, credentials.

Every test that takes ``lake_root`` runs twice: on a local tmp path and on
``abfs://lake@devstoreaccount1.dfs.core.windows.net/<prefix>`` through Azurite's blob endpoint.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from datalake.azure import AzureBlobResource
from datalake.lake import DuckDBResource, ParquetPaths
from datalake.storage import (
    FOOTER_PREFETCH_BYTES,
    INPROGRESS_MARKER,
    ArrowReads,
    LakeStorage,
    ListedFile,
    ProtocolAlias,
    _PositionalFile,
    is_visible_name,
    parse_root,
)
from datalake_tests.helpers import REPO
from datalake_tests.lake_roots import (
    CONTAINER,
    ROOT_KINDS,
    LakeRoot,
    azure_url,
    ensure_container,
    key_resource,
    make_root,
    sas_resource,
)
from datalake_tests.services import AzuriteServer


@pytest.fixture(params=ROOT_KINDS)
def lake_root(request: pytest.FixtureRequest, tmp_path: Path) -> LakeRoot:
    """Local tmp path, then Azurite: every test using it runs on both."""
    return make_root(request.param, tmp_path, request)


def _table(n: int, offset: int = 0) -> pa.Table:
    return pa.table(
        {"id": pa.array(range(offset, offset + n), pa.int64()), "v": [f"row{i}" for i in range(n)]}
    )


def _write(storage: LakeStorage, relative: str, table: pa.Table) -> None:
    with storage.atomic_writer(relative) as handle:
        pq.write_table(table, handle)


def _read(storage: LakeStorage, relative: str) -> pa.Table:
    with storage.open_read(relative) as handle:
        return pq.read_table(handle)


def _duckdb_glob_rows(storage: LakeStorage, pattern: str) -> int:
    """Rows DuckDB finds through a glob: what a reader outside the IO managers sees."""
    con = duckdb.connect()
    if storage.root.is_azure:
        con.register_filesystem(storage.fs)
    glob = storage.reader_path(pattern)
    files = con.sql(f"SELECT count(*) FROM glob('{glob}')").fetchall()[0][0]
    if not files:
        return 0
    return con.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0][0]


def _path_input(
    storage: LakeStorage,
    relative: str,
    con: duckdb.DuckDBPyConnection | None = None,
    schema: pa.Schema | None = None,
) -> duckdb.DuckDBPyRelation:
    """``relative`` as DuckDB reads it through a path input's handle (the root's scan filesystem)."""
    paths = ParquetPaths(
        asset_key=dg.AssetKey("t"),
        files=(storage.reader_path(relative),),
        schema=schema or storage.read_schema(relative),
        filesystem=storage.scan_fs,
    )
    return paths.relation(con or DuckDBResource(memory_limit="1GB").connect())


def _path_input_rows(storage: LakeStorage, relative: str) -> int:
    return _path_input(storage, relative).aggregate("count(*)").fetchall()[0][0]


@pytest.mark.azurite
def test_reading_azure_files_gives_the_connection_its_remote_threads(
    azurite_server: AzuriteServer, tmp_path: Path
) -> None:
    """DuckDB's scan threads each wait on one request: a connection reading Azure files gets the
    resource's ``remote_threads`` (unless it has more, or they are 0) and DuckDB's Parquet
    prefetching; local reads keep ``threads``, without prefetching."""
    ensure_container(azurite_server)
    remote = LakeStorage(
        azure_url(azurite_server, f"threads-{os.getpid()}-{dt.datetime.now(dt.UTC):%H%M%S%f}"),
        key_resource(azurite_server),
    )
    local = LakeStorage(str(tmp_path / "lake"))
    for storage in (remote, local):
        _write(storage, "t/a.parquet", _table(3))

    def after_reading(storage: LakeStorage, resource: DuckDBResource) -> tuple[int, bool]:
        """The connection's threads and whether prefetching is off, after reading ``storage``."""
        con = resource.connect()
        assert _path_input(storage, "t/a.parquet", con).aggregate("count(*)").fetchall() == [(3,)]
        return con.sql(
            "SELECT current_setting('threads'), current_setting('disable_parquet_prefetching')"
        ).fetchall()[0]

    assert after_reading(remote, DuckDBResource(threads=2)) == (16, False)
    assert after_reading(remote, DuckDBResource(threads=2, remote_threads=6)) == (6, False)
    assert after_reading(remote, DuckDBResource(threads=24, remote_threads=6)) == (24, False)
    assert after_reading(remote, DuckDBResource(threads=2, remote_threads=0)) == (2, False)
    assert after_reading(local, DuckDBResource(threads=2)) == (2, True)


@pytest.mark.parametrize("credential", ["key", "sas", "default"])
def test_azure_storage_variables_never_replace_the_configured_account_or_credential(
    monkeypatch: pytest.MonkeyPatch, credential: str
) -> None:
    """adlfs takes what it is not given from AZURE_STORAGE_* variables, and prefers a connection
    string to every credential: another tool's variables had the lake written to their account."""
    from dagster_azure.adls2 import ADLS2DefaultAzureCredential, ADLS2Key, ADLS2SASToken

    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        "DefaultEndpointsProtocol=https;AccountName=elsewhere;AccountKey=ZWxzZXdoZXJl;"
        "BlobEndpoint=https://elsewhere.blob.core.windows.net;",
    )
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "ZWxzZXdoZXJl")
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "sv=2024&sig=elsewhere")
    configured = {
        "key": ADLS2Key(key="Y29uZmlndXJlZA=="),
        "sas": ADLS2SASToken(token="sv=2024&sig=configured"),
        "default": ADLS2DefaultAzureCredential(kwargs={}),
    }[credential]
    fs: Any = AzureBlobResource(credential=configured).filesystem("lakeaccount")
    client = fs.service_client
    assert client.account_name == "lakeaccount"
    assert client.url.startswith("https://lakeaccount.blob.core.windows.net")
    if credential == "sas":
        assert "sig=configured" in client.url and "elsewhere" not in client.url
    elif credential == "key":
        assert client.credential.account_key == "Y29uZmlndXJlZA=="
    else:
        assert type(client.credential).__name__ == "DefaultAzureCredential"


def test_root_urls_parse() -> None:
    local = parse_root("/opt/dagster/shared-data/bronze/")
    assert (local.scheme, local.base) == ("file", "/opt/dagster/shared-data/bronze")
    assert parse_root("file:///mnt/nfs/silver").base == "/mnt/nfs/silver"
    adls = parse_root("abfs://lake@acct.dfs.core.windows.net/silver/")
    assert (adls.scheme, adls.base, adls.account) == ("abfs", "lake/silver", "acct")
    az = parse_root("az://lake/gold")
    assert (az.base, az.account) == ("lake/gold", None)
    with pytest.raises(ValueError, match="unsupported storage root"):
        parse_root("s3://bucket/x")
    with pytest.raises(ValueError, match="no container"):
        parse_root("abfs://@acct.dfs.core.windows.net/x")
    # The account host where the container belongs (a root that would write to a container
    # named after the host).
    with pytest.raises(ValueError, match=r"'acct\.dfs\.core\.windows\.net' is not a container name"):
        parse_root("abfs://acct.dfs.core.windows.net/lake/silver")
    # A SAS in the URL would be recorded as every file's dagster/uri: refused, and not echoed.
    with pytest.raises(ValueError, match="query or fragment") as refused:
        parse_root("abfs://lake@acct.dfs.core.windows.net/silver?sv=2024&sig=SECRETSIG")
    assert "SECRETSIG" not in str(refused.value)
    # az:// takes the account from the blob endpoint (Azurite's path-style URL, or the host).
    assert AzureBlobResource(blob_endpoint="http://127.0.0.1:10000/devstoreaccount1").account(None) == (
        "devstoreaccount1"
    )
    assert AzureBlobResource(blob_endpoint="https://acct2.blob.core.windows.net").account(None) == "acct2"


def test_azure_credentials_stay_out_of_reprs() -> None:
    """A resource's repr (an f-string in a log line, an error message) carries no key or SAS."""
    from dagster_azure.adls2 import ADLS2Key, ADLS2SASToken

    from datalake.io_managers import DuckDBPathInputManager, ParquetIOManager

    root = "abfs://lake@acct.dfs.core.windows.net/silver"
    for credential, secret in (
        (ADLS2Key(key="KEY-never-shown=="), "KEY-never-shown"),
        (ADLS2SASToken(token="sv=2024&sig=SAS-never-shown"), "SAS-never-shown"),
    ):
        azure = AzureBlobResource(credential=credential, blob_endpoint="http://127.0.0.1:1/acct")
        for resource in (
            azure,
            ParquetIOManager(root=root, azure=azure),
            DuckDBPathInputManager(roots={"silver_io_manager": root}, azure=azure),
        ):
            assert secret not in repr(resource) and secret not in str(resource)
            assert "AzureBlobResource(" in repr(resource)  # shown, just without its credential


def test_the_source_password_stays_out_of_reprs() -> None:
    from datalake.source import V3SourceResource

    source = V3SourceResource(kind="mysql", host="db", user="reader", password="PW-never-shown")
    assert "PW-never-shown" not in repr(source) and "PW-never-shown" not in str(source)
    assert "host='db'" in repr(source)


def test_in_progress_and_hidden_names_are_invisible(tmp_path: Path) -> None:
    storage = LakeStorage(str(tmp_path))
    for name in (
        "t/ingestion_date=2025-01-01/t_run1.parquet",
        f"t/ingestion_date=2025-01-01/.t_run2.parquet{INPROGRESS_MARKER}abc",
        "t/ingestion_date=2025-01-01/.hidden.parquet",
        f"t/.tmp{INPROGRESS_MARKER}x/part.parquet",
        "t/_notes.txt",
    ):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert storage.list_files("t/") == ["t/ingestion_date=2025-01-01/t_run1.parquet"]
    assert not is_visible_name(f"a/.b{INPROGRESS_MARKER}1/c.parquet")


# atomic_arrow_writer: Arrow's own file on local disk (what Parquet files are written through).
WRITERS = pytest.mark.parametrize("writer", ["atomic_writer", "atomic_arrow_writer"])


@WRITERS
def test_atomic_write_appears_only_when_complete(lake_root: LakeRoot, writer: str) -> None:
    storage = lake_root.storage()
    table = _table(1000)
    with getattr(storage, writer)("t/a.parquet") as handle:
        pq.write_table(table, handle)
        # More than one staged block on Azure (8 MiB): written, yet not visible to anyone.
        handle.write(os.urandom(9 * 2**20))
        assert storage.list_files("t/") == []
        assert not storage.exists("t/a.parquet")
    assert storage.list_files("t/") == ["t/a.parquet"]
    assert storage.size("t/a.parquet") > 9 * 2**20
    if lake_root.kind == "azure":
        assert storage.uri("t/a.parquet") == f"{lake_root.url}/t/a.parquet"
        assert storage.reader_path("t/a.parquet").startswith("abfs://lake/")
    else:
        assert storage.uri("t/a.parquet") == str(Path(lake_root.url) / "t" / "a.parquet")


@WRITERS
def test_failed_write_keeps_the_previous_version(lake_root: LakeRoot, writer: str) -> None:
    storage = lake_root.storage()
    _write(storage, "t/a.parquet", _table(10))
    with (
        pytest.raises(RuntimeError, match="source went away"),
        getattr(storage, writer)("t/a.parquet") as handle,
    ):
        pq.write_table(_table(20, offset=100), handle)
        handle.write(os.urandom(9 * 2**20))
        raise RuntimeError("source went away")
    assert storage.list_files("t/") == ["t/a.parquet"]
    assert _read(storage, "t/a.parquet").equals(_table(10))
    if lake_root.kind == "local":
        assert sorted(p.name for p in (Path(lake_root.url) / "t").iterdir()) == ["a.parquet"]  # no temp left


def test_a_group_publishes_its_files_together_or_none(lake_root: LakeRoot) -> None:
    storage = lake_root.storage()
    names = [f"t/{n}.parquet" for n in "abc"]
    for name in names:
        _write(storage, name, _table(10))
    # b fails after a is completely written (flushed and fsynced, or its blocks staged): none changes.
    with pytest.raises(RuntimeError, match="disk full"), storage.atomic_group() as group:
        for name in names:
            with storage.atomic_arrow_writer(name, group=group) as handle:
                pq.write_table(_table(20, offset=100), handle)
                if name.endswith("b.parquet"):
                    raise RuntimeError("disk full")
    assert storage.list_files("t/") == names
    assert all(_read(storage, name).equals(_table(10)) for name in names)
    if lake_root.kind == "local":
        assert sorted(p.name for p in (Path(lake_root.url) / "t").iterdir()) == [
            "a.parquet",
            "b.parquet",
            "c.parquet",
        ]
    # A clean block: nothing changes until it ends, then every file does.
    with storage.atomic_group() as group:
        for name in names:
            with storage.atomic_writer(name, group=group) as handle:
                pq.write_table(_table(20, offset=100), handle)
        assert all(_read(storage, name).equals(_table(10)) for name in names)
    assert all(_read(storage, name).equals(_table(20, offset=100)) for name in names)


_SPLIT_CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys
    import dagster as dg
    import pyarrow as pa
    from datalake.lake import PartitionAssigner, write_partitions
    from datalake.storage import LakeStorage

    keys = [f"p{i}" for i in range(6)]
    schema = pa.schema([("p", pa.string()), ("blob", pa.binary())])
    # p3 is ~1 MiB (incompressible); the others a few bytes. Their files are written as the split ends.
    batches = [pa.record_batch({"p": [k], "blob": [os.urandom(2**20 if k == "p3" else 8)]}, schema) for k in keys]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    write_partitions(
        LakeStorage(sys.argv[1]),
        {k: f"split/{k}.parquet" for k in keys},
        pa.RecordBatchReader.from_batches(schema, iter(batches)),
        PartitionAssigner.for_partitions(dg.StaticPartitionsDefinition(keys), keys, "p"),
        row_group_size=122_880,
        row_group_bytes=2**24,
        )
    """
)


def test_a_range_split_whose_partition_cannot_be_written_replaces_no_partition(tmp_path: Path) -> None:
    """One partition's file fails while the split writes its files (a full disk, a quota): every
    partition keeps its previous file, including those whose new file was complete."""
    storage = LakeStorage(str(tmp_path / "lake"))
    keys = [f"p{i}" for i in range(6)]
    for key in keys:
        _write(storage, f"split/{key}.parquet", _table(10))
    child = subprocess.run(
        [sys.executable, "-c", _SPLIT_CHILD, str(tmp_path / "lake")], cwd=REPO, capture_output=True, text=True
    )
    assert child.returncode != 0
    assert "File too large" in child.stderr or "Errno 27" in child.stderr, child.stderr[-2000:]
    assert storage.list_files("split/") == [f"split/{k}.parquet" for k in keys]
    assert all(_read(storage, f"split/{k}.parquet").equals(_table(10)) for k in keys)
    assert sorted(p.name for p in (tmp_path / "lake" / "split").iterdir()) == [f"{k}.parquet" for k in keys]


_KILL_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import pyarrow as pa, pyarrow.parquet as pq
    from dagster_azure.adls2 import ADLS2Key
    from datalake.azure import AzureBlobResource
    from datalake.storage import LakeStorage

    cfg = json.loads(sys.argv[1])
    azure = AzureBlobResource(credential=ADLS2Key(key=cfg["key"]), blob_endpoint=cfg["endpoint"]) if cfg["key"] else None
    storage = LakeStorage(cfg["url"], azure)
    schema = pa.schema([("payload", pa.binary())])
    with storage.atomic_writer("t/a.parquet") as old, storage.atomic_arrow_writer("t/fresh.parquet") as new:
        writers = [pq.ParquetWriter(old, schema), pq.ParquetWriter(new, schema)]
        for i in range(24):  # 1 MiB incompressible row groups: blocks get staged on Azure
            for w in writers:
                w.write_table(pa.table({"payload": [os.urandom(2**20)]}, schema=schema))
        print("MIDWAY", flush=True)
        time.sleep(600)
    """
)


def test_killed_write_leaves_nothing_visible(lake_root: LakeRoot) -> None:
    storage = lake_root.storage()
    _write(storage, "t/a.parquet", _table(10))
    server = lake_root.server
    cfg = {
        "url": lake_root.url,
        "key": server.account_key if server else None,
        "endpoint": server.blob_endpoint if server else None,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, json.dumps(cfg)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "MIDWAY", "the child did not get midway"
        # Proof that the write really is in progress when it is killed.
        if lake_root.kind == "local":
            temps = [p.name for p in (Path(lake_root.url) / "t").iterdir() if INPROGRESS_MARKER in p.name]
            assert len(temps) == 2
        else:
            assert server is not None
            assert _uncommitted_blocks(server, storage.path("t/fresh.parquet")) > 0
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    # Readers see only the complete previous version: listing, direct read, DuckDB glob.
    assert storage.list_files("t/") == ["t/a.parquet"]
    assert _read(storage, "t/a.parquet").equals(_table(10))
    assert _duckdb_glob_rows(storage, "t/*.parquet") == 10
    assert _duckdb_glob_rows(storage, "**/*.parquet") == 10


def _uncommitted_blocks(server: AzuriteServer, path: str) -> int:
    from azure.storage.blob import BlobServiceClient

    container, _, blob = path.partition("/")
    client = BlobServiceClient.from_connection_string(server.connection_string).get_blob_client(
        container, blob
    )
    _committed, uncommitted = client.get_block_list("uncommitted")
    return len(uncommitted)


@pytest.mark.azurite
def test_roots_on_one_account_share_a_filesystem_that_keeps_no_listings(
    azurite_server: AzuriteServer,
) -> None:
    """One client (and credential) per account for the resource's life, never a stale listing.

    Every root on an account gets the resource's one filesystem, so a step with several inputs
    and an output authenticates once. Being shared, it must not answer from a listing it made
    earlier: a file another process commits afterwards is found by the next read and listing.
    """
    ensure_container(azurite_server)
    azure = key_resource(azurite_server)
    prefix = f"shared-{os.getpid()}-{dt.datetime.now(dt.UTC):%H%M%S%f}"
    silver = LakeStorage(azure_url(azurite_server, f"{prefix}/silver"), azure)
    gold = LakeStorage(azure_url(azurite_server, f"{prefix}/gold"), azure)
    assert silver.fs is gold.fs
    assert azure.filesystem(azurite_server.second_account().account_name) is not silver.fs

    _write(silver, "t/a.parquet", _table(2))
    assert silver.list_files("t/") == ["t/a.parquet"]
    # A directory listing through the shared filesystem (pyarrow's dataset discovery, a glob).
    assert [p.rsplit("/", 1)[-1] for p in silver.fs.ls(silver.path("t"))] == ["a.parquet"]
    assert not silver.exists("t/b.parquet")
    # Another process (its own resource and filesystem) commits a file into the listed directory.
    _write(
        LakeStorage(azure_url(azurite_server, f"{prefix}/silver"), key_resource(azurite_server)),
        "t/b.parquet",
        _table(3),
    )
    # Opening the file asks for its size first (what DuckDB's and pyarrow's reads do): from a
    # kept listing of t/ that would be "no such file".
    assert _read(silver, "t/b.parquet").num_rows == 3
    assert gold.fs.info(silver.path("t/b.parquet"))["size"] > 0
    assert silver.list_files("t/") == ["t/a.parquet", "t/b.parquet"]


@pytest.mark.azurite
@pytest.mark.parametrize("reader", ["arrow", "adlfs"])
def test_duckdb_fetches_only_the_column_chunks_it_reads(
    azurite_server: AzuriteServer, monkeypatch: pytest.MonkeyPatch, reader: Literal["arrow", "adlfs"]
) -> None:
    """A projection over an Azure file transfers its column chunks, not the rest of the file.

    The small column comes first in the file and a ~4 MB one after it; a read-ahead cache would
    fetch from the small chunk on to the end of the file. Both readers make one ranged request per
    positional read (Arrow's client; adlfs' ``cat_file``), counted there.
    """
    fetched: list[int] = []
    fetch = _PositionalFile.read

    def counting(self: _PositionalFile, size: int | None = -1) -> bytes:
        data = fetch(self, size)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(_PositionalFile, "read", counting)
    ensure_container(azurite_server)
    azure = key_resource(azurite_server, duckdb_reader=reader)
    storage = LakeStorage(
        azure_url(azurite_server, f"chunks-{reader}-{os.getpid()}-{dt.datetime.now(dt.UTC):%H%M%S%f}"), azure
    )
    assert isinstance(storage.scan_fs, ArrowReads) == (reader == "arrow")
    rows = 2_000
    table = pa.table(
        {"small": pa.array(range(rows), pa.int64()), "big": [os.urandom(2_000) for _ in range(rows)]}
    )
    _write(storage, "t/a.parquet", table)
    size = storage.size("t/a.parquet")
    assert size > 3_000_000
    fetched.clear()  # the write's own reads, if any
    relation = _path_input(storage, "t/a.parquet", schema=table.schema)
    assert relation.aggregate("sum(small)").fetchall() == [(sum(range(rows)),)]
    assert 0 < sum(fetched) < 100_000, f"{sum(fetched):,} bytes fetched of a {size:,}-byte file"


def test_a_threads_seek_is_kept_for_its_own_read() -> None:
    """DuckDB's positional read is ``seek`` then ``read``, and another thread may seek the same
    handle in between: each read starts at its own thread's seek."""
    import threading

    data = bytes(range(256)) * 4
    requests: list[tuple[int, int]] = []

    def read_at(size: int, offset: int) -> bytes:
        requests.append((offset, size))
        return data[offset : offset + size]

    handle = _PositionalFile(len(data), read_at)
    sought, other_done = threading.Event(), threading.Event()
    got: dict[str, bytes] = {}

    def first() -> None:
        handle.seek(100)
        sought.set()
        other_done.wait(10)
        got["first"] = handle.read(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert sought.wait(10)
    handle.seek(500)  # this thread's seek lands between the other's seek and its read
    got["second"] = handle.read(10)
    other_done.set()
    thread.join(10)
    assert got == {"first": data[100:110], "second": data[500:510]}
    # Without a seek of its own, a read continues where the last one ended.
    handle.seek(1_000)
    assert handle.read(4) == data[1_000:1_004]
    assert handle.read() == data[1_004:]
    assert handle.read(8) == b""
    buffer = bytearray(3)
    handle.seek(-3, io.SEEK_END)
    assert handle.readinto(buffer) == 3 and bytes(buffer) == data[-3:]
    assert (100, 10) in requests and (500, 10) in requests  # one request per read, exactly its range


@pytest.mark.azurite
@pytest.mark.parametrize("reader", ["arrow", "adlfs"])
def test_duckdb_reads_one_handle_from_several_threads(
    azurite_server: AzuriteServer, monkeypatch: pytest.MonkeyPatch, reader: Literal["arrow", "adlfs"]
) -> None:
    """Why a handle keeps each thread's seek: DuckDB shares one handle per file among its scan
    threads (it expects positional reads to be ``pread``). Counted on a parallel scan of two files
    through both readers, which read the exact answer."""
    import threading

    # Keyed by the handle itself (kept alive): a closed handle's id() is reused by the next one.
    readers: dict[_PositionalFile, set[int]] = {}
    read = _PositionalFile.read

    def recording(self: _PositionalFile, size: int | None = -1) -> bytes:
        readers.setdefault(self, set()).add(threading.get_ident())
        return read(self, size)

    monkeypatch.setattr(_PositionalFile, "read", recording)
    ensure_container(azurite_server)
    storage = LakeStorage(
        azure_url(azurite_server, f"handles-{reader}-{os.getpid()}-{dt.datetime.now(dt.UTC):%H%M%S%f}"),
        key_resource(azurite_server, duckdb_reader=reader),
    )
    table = _table(64_000)
    for name in ("a", "b"):
        with storage.atomic_writer(f"t/{name}.parquet") as handle:
            pq.write_table(table, handle, row_group_size=2_000)  # 32 row groups to share out
    paths = ParquetPaths(
        asset_key=dg.AssetKey("t"),
        files=(storage.reader_path("t/a.parquet"), storage.reader_path("t/b.parquet")),
        schema=table.schema,
        filesystem=storage.scan_fs,
    )
    con = DuckDBResource(memory_limit="1GB", threads=8, remote_threads=0).connect()
    assert paths.relation(con).aggregate("count(*), sum(id), sum(length(v))").fetchall() == [
        (128_000, 2 * sum(range(64_000)), 2 * sum(len(f"row{i}") for i in range(64_000)))
    ]
    shared = [handle for handle, threads in readers.items() if len(threads) > 1]
    assert shared, (
        f"every handle was read by one thread ({len(readers)} handles): update _PositionalFile's doc"
    )


@pytest.mark.azurite
@pytest.mark.parametrize("scope", ["container", "account"])
def test_sas_token_reaches_every_reader(azurite_server: AzuriteServer, scope: str) -> None:
    """A SAS works for writes, listings, pyarrow, polars' native lazy reader and DuckDB."""
    from azure.storage.blob import (
        AccountSasPermissions,
        ContainerSasPermissions,
        ResourceTypes,
        generate_account_sas,
        generate_container_sas,
    )

    ensure_container(azurite_server)
    expiry = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    account, key = azurite_server.account_name, azurite_server.account_key
    if scope == "container":
        token = generate_container_sas(
            account,
            CONTAINER,
            account_key=key,
            permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True, create=True),
            expiry=expiry,
        )
        read_only = generate_container_sas(
            account,
            CONTAINER,
            account_key=key,
            permission=ContainerSasPermissions(read=True, list=True),
            expiry=expiry,
        )
    else:
        types = ResourceTypes(service=True, container=True, object=True)
        token = generate_account_sas(
            account,
            key,
            resource_types=types,
            permission=AccountSasPermissions(read=True, write=True, delete=True, list=True, create=True),
            expiry=expiry,
        )
        read_only = generate_account_sas(
            account,
            key,
            resource_types=types,
            permission=AccountSasPermissions(read=True, list=True),
            expiry=expiry,
        )
    url = azure_url(azurite_server, f"sas-{scope}")
    storage = LakeStorage(url, sas_resource(azurite_server, "?" + token))  # a leading '?' is tolerated
    _write(storage, "t/a.parquet", _table(5))
    assert storage.list_files("t/") == ["t/a.parquet"]
    assert _read(storage, "t/a.parquet").num_rows == 5
    source, options = storage.polars_source("t/a.parquet")
    assert options is not None and "sas_token" in options and "account_key" not in options
    assert pl.scan_parquet(source, storage_options=options).select(pl.len()).collect().item() == 5
    assert _duckdb_glob_rows(storage, "t/*.parquet") == 5
    assert isinstance(storage.scan_fs, ArrowReads)  # what path inputs hand DuckDB: Arrow's client, the SAS
    assert _path_input_rows(storage, "t/a.parquet") == 5

    # The token is what grants access: a read-only one reads but cannot write.
    reader = LakeStorage(url, sas_resource(azurite_server, read_only))
    assert reader.list_files("t/") == ["t/a.parquet"]
    assert _path_input_rows(reader, "t/a.parquet") == 5
    with pytest.raises(Exception), reader.atomic_writer("t/b.parquet") as handle:  # noqa: B017
        handle.write(b"x" * 10)
    assert storage.list_files("t/") == ["t/a.parquet"]


@pytest.mark.azurite
def test_a_range_split_on_azure_holds_small_blocks_per_open_partition(
    azurite_server: AzuriteServer, tmp_path: Path
) -> None:
    """A range split keeps every partition's file open until the end; on Azure each holds the
    bytes not yet staged as a block. 15 partitions of 3 MiB: with 8 MiB blocks nothing would be
    staged before the end (54 MiB traced); with the split's 1 MiB blocks about 1 MiB each (4 MiB)."""
    import tracemalloc

    from datalake.lake import PartitionAssigner, write_partitions

    ensure_container(azurite_server)
    keys = [f"p{i:02d}" for i in range(15)]
    schema = pa.schema([("p", pa.string()), ("blob", pa.binary())])

    def batches() -> Iterator[pa.RecordBatch]:
        for key in keys:  # ordered by partition, incompressible: 3 MiB of file each
            for _ in range(3):
                yield pa.record_batch(
                    {"p": [key] * 16, "blob": [os.urandom(2**16) for _ in range(16)]}, schema
                )

    def traced_peak(storage: LakeStorage) -> int:
        assigner = PartitionAssigner.for_partitions(dg.StaticPartitionsDefinition(keys), keys, "p")
        tracemalloc.start()
        try:
            results = write_partitions(
                storage,
                {k: f"split/{k}.parquet" for k in keys},
                pa.RecordBatchReader.from_batches(schema, batches()),
                assigner,
                row_group_size=122_880,
                row_group_bytes=2**20,
            )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert {k: r.rows for k, r in results.items()} == dict.fromkeys(keys, 48)
        assert all(r.bytes > 3 * 2**20 for r in results.values())
        return peak

    traced_peak(LakeStorage(str(tmp_path / "lake")))  # the same on local disk: first-use imports
    azure = traced_peak(
        LakeStorage(
            azure_url(azurite_server, f"split-{os.getpid()}-{dt.datetime.now(dt.UTC):%H%M%S%f}"),
            key_resource(azurite_server),
        )
    )
    assert azure < 20 * 2**20, f"{azure / 2**20:.0f} MiB traced for 15 open partition files on Azure"


def test_a_write_removes_temp_files_of_writers_that_are_gone_and_no_others(tmp_path: Path) -> None:
    """Local/NFS: a killed write's temp file (any file name of the directory: a retry after an OOM
    is a new run id) goes with the next write; a live writer's, however idle, stays."""
    from datalake.storage import (
        _HOST,  # pyright: ignore[reportPrivateUsage]
        _pid_namespace,  # pyright: ignore[reportPrivateUsage]
        _process_start,  # pyright: ignore[reportPrivateUsage]
    )

    directory = tmp_path / "t" / "ingestion_date=2025-01-01"
    directory.mkdir(parents=True)
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    two_days_ago = time.time() - 2 * 86400
    here = f"{_HOST}-{_pid_namespace()}"
    live_start = _process_start(live.pid)
    assert live_start is not None

    def temp(name: str, owner: str, *, old: bool) -> Path:
        path = directory / f".{name}{INPROGRESS_MARKER}{owner}{uuid.uuid4().hex}"
        path.write_bytes(b"partial")
        if old:
            os.utime(path, (two_days_ago, two_days_ago))
        return path

    try:
        kept = [
            temp("t_run1.parquet", f"{here}-{live.pid}-{live_start}-", old=True),  # live, idle for days
            temp("t_run2.parquet", "other-host-1-7-1-", old=False),  # another pod's, recent: may be live
            # This host name but another PID namespace (a container sharing the host's UTS
            # namespace): its PIDs mean nothing here, so only its age counts.
            temp("t_run3.parquet", f"{_HOST}-{_pid_namespace() + 1}-{dead.pid}-1-", old=False),
        ]
        removed = [
            temp("t_run4.parquet", f"{here}-{dead.pid}-1-", old=False),  # this namespace, process gone
            temp("t_run5.parquet", f"{here}-{live.pid}-{live_start + 1}-", old=False),  # its PID reused
            temp("t_run6.parquet", "other-host-1-8-1-", old=True),  # another pod's, untouched for a day
            temp("t_run7.parquet", "", old=True),  # named before writers were (no owner)
        ]
        storage = LakeStorage(str(tmp_path))
        _write(storage, "t/ingestion_date=2025-01-01/t_run8.parquet", _table(3))
        left = {p.name for p in directory.iterdir()}
        assert left == {p.name for p in kept} | {"t_run8.parquet"}
        assert not {p.name for p in removed} & left
    finally:
        live.kill()
        live.wait()


def test_a_listing_carries_modification_times_so_the_latest_file_costs_no_request(
    lake_root: LakeRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The latest bronze file of a day (by write time; names sort by run id) comes from the listing
    itself: on Azure a request per file of the day would add up for every path input."""
    from datalake.io_managers import latest_file

    storage = lake_root.storage()
    day = "t/ingestion_date=2025-01-01"
    _write(storage, f"{day}/t_run-b.parquet", _table(1))
    time.sleep(1.1)  # modification times of a second's resolution still differ
    _write(storage, f"{day}/t_run-a.parquet", _table(2))
    files = storage.list_files("t/")
    assert files == [f"{day}/t_run-a.parquet", f"{day}/t_run-b.parquet"]

    def no_request(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a request per file")

    monkeypatch.setattr(storage.fs, "modified", no_request)
    monkeypatch.setattr(storage.fs, "info", no_request)
    assert latest_file(storage, files) == f"{day}/t_run-a.parquet"


def test_footer_prefetch_stops_at_its_budget_and_duckdb_reads_the_rest_itself(tmp_path: Path) -> None:
    """An input of very many files holds at most the budget's footers in memory, whatever their
    length (a review found 325 MiB held under the 128 MiB budget: footers longer than 16 KiB)."""
    data = io.BytesIO()  # 700 row groups: a ~136 KB footer
    pq.write_table(pa.table({"id": range(700), "v": [str(i) for i in range(700)]}), data, row_group_size=1)
    footer = pq.read_metadata(pa.BufferReader(data.getvalue())).serialized_size
    assert footer > FOOTER_PREFETCH_BYTES
    listed = {}
    for n in range(6):
        path = tmp_path / f"part-{n}.parquet"
        path.write_bytes(data.getvalue())
        listed[str(path)] = ListedFile(path.stat().st_size, time.time())
    alias = ProtocolAlias(LocalFileSystem(), "budgeted", listed)
    alias.prefetch_footers(threads=4, budget_bytes=int(2.5 * footer))
    assert footer < alias.prefetched_bytes <= int(2.5 * footer)  # two of the six
    con = duckdb.connect()
    con.register_filesystem(alias)
    relation = con.read_parquet([f"budgeted://{path}" for path in listed], union_by_name=True)
    assert relation.aggregate("count(*), sum(id)").fetchall() == [(6 * 700, 6 * sum(range(700)))]


def test_path_inputs_of_one_schema_skip_the_union_by_name_and_read_the_same(tmp_path: Path) -> None:
    """Binding a union by name parses every footer in turn; files known to agree need none."""
    same = pa.schema([("id", pa.int64()), ("v", pa.string())])
    wider = same.append(pa.field("extra", pa.float64()))
    paths: list[str] = []
    for n, schema in enumerate([same, same, wider]):
        path = tmp_path / f"part-{n}.parquet"
        columns: dict[str, list[Any]] = {"id": [n], "v": [f"v{n}"]} | (
            {"extra": [1.5]} if schema is wider else {}
        )
        pq.write_table(pa.table(columns, schema=schema), path)
        paths.append(str(path))

    def handle(files: list[str]) -> ParquetPaths:
        return ParquetPaths(
            dg.AssetKey("t"), tuple(files), same, file_schemas={f: pq.read_schema(f) for f in files}
        )

    con = duckdb.connect()
    agreeing, mixed = handle(paths[:2]), handle(paths)
    assert agreeing._one_schema() and not mixed._one_schema()
    assert not ParquetPaths(dg.AssetKey("t"), tuple(paths[:2]), same)._one_schema()  # schemas unknown
    assert sorted(agreeing.relation(con).fetchall()) == [(0, "v0"), (1, "v1")]
    assert sorted(mixed.relation(con).fetchall()) == [(0, "v0", None), (1, "v1", None), (2, "v2", 1.5)]
