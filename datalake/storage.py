"""One storage abstraction over a root URL: a local/NFS path or Azure Data Lake Storage.

A root is ``/abs/path`` (local disk or an NFS mount), ``abfs://container@account.dfs.core.windows.net/prefix``
or ``az://container/prefix`` (account from the credentials resource). Azure is reached through
the *blob* endpoint (adlfs), which every ADLS Gen2 account serves and the Azurite emulator
implements, so the same code path is tested locally.

Visibility contract (DESIGN §3.4): a file appears atomically or not at all.
- local/NFS: written under a hidden in-progress name in the target directory, fsynced, then
  ``os.replace``d onto its final name (and the directory fsynced);
- Azure: written as staged blocks that become visible only when the block list is committed
  at close; a failed write is discarded without committing.
Readers list only final names.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast
from urllib.parse import urlparse

import dagster as dg
import fsspec
from dagster_azure.adls2 import ADLS2DefaultAzureCredential, ADLS2Key, ADLS2SASToken
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field

INPROGRESS_MARKER = ".inprogress-"
_AZURE_SCHEMES = ("abfs", "abfss", "az")


def is_visible_name(name: str) -> bool:
    """Readers ignore hidden and in-progress names."""
    base = posixpath.basename(name)
    return not base.startswith(".") and INPROGRESS_MARKER not in base


class AzureBlobResource(dg.ConfigurableResource):
    """Credentials for Azure roots, as dagster-azure credential configs (values via ``EnvVar``).

    ``blob_endpoint`` overrides ``https://<account>.blob.core.windows.net`` — for the Azurite
    emulator (``http://127.0.0.1:10000/devstoreaccount1``) or a sovereign cloud.
    """

    # DefaultAzureCredential (managed identity, workload identity, az login) unless a key or SAS is given.
    credential: ADLS2Key | ADLS2SASToken | ADLS2DefaultAzureCredential = Field(
        default=ADLS2DefaultAzureCredential(kwargs={}), discriminator="credential_type"
    )
    blob_endpoint: str | None = None
    account_name: str | None = None

    def filesystem(self, account_name: str | None) -> fsspec.AbstractFileSystem:
        import adlfs  # imported lazily: the azure SDK is slow to import and local runs don't need it

        account = account_name or self.account_name
        if not account:
            raise ValueError("Azure root has no account: use abfs://container@account... or set account_name")
        kwargs: dict[str, Any] = {"account_name": account}
        credential = self.credential
        if isinstance(credential, ADLS2Key):
            kwargs["account_key"] = credential.key
        elif isinstance(credential, ADLS2SASToken):
            kwargs["sas_token"] = credential.token
        elif isinstance(credential, ADLS2DefaultAzureCredential):
            from azure.identity.aio import DefaultAzureCredential

            kwargs["credential"] = DefaultAzureCredential(**credential.kwargs)
        if self.blob_endpoint:
            endpoint = self.blob_endpoint.rstrip("/")
            parts = [f"DefaultEndpointsProtocol={urlparse(endpoint).scheme}", f"AccountName={account}"]
            if isinstance(credential, ADLS2Key) and credential.key:
                parts.append(f"AccountKey={credential.key}")
            if isinstance(credential, ADLS2SASToken) and credential.token:
                parts.append(f"SharedAccessSignature={credential.token.lstrip('?')}")
            parts.append(f"BlobEndpoint={endpoint}")
            kwargs = {"connection_string": ";".join(parts) + ";", "account_name": account}
        # skip_instance_cache: credentials differ per resource; never share a cached client.
        return adlfs.AzureBlobFileSystem(skip_instance_cache=True, **kwargs)


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


def parse_root(url: str) -> StorageRoot:
    parsed = urlparse(url)
    if parsed.scheme in _AZURE_SCHEMES:
        container, _, account_host = parsed.netloc.partition("@")
        if not container:
            raise ValueError(f"Azure root {url!r} names no container")
        account = account_host.split(".")[0] if account_host else None
        base = posixpath.join(container, parsed.path.strip("/")).rstrip("/")
        return StorageRoot(url=url.rstrip("/"), scheme="abfs", base=base, account=account)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        return StorageRoot(url=os.path.abspath(path), scheme="file", base=os.path.abspath(path))
    raise ValueError(f"unsupported storage root {url!r}: use a path, abfs://container@account/... or az://")


class LakeStorage:
    """Files under one root. Paths given to it are relative to the root, with '/' separators."""

    def __init__(self, root: str, azure: AzureBlobResource | None = None):
        self.root = parse_root(root)
        if self.root.is_azure:
            self.fs: fsspec.AbstractFileSystem = (azure or AzureBlobResource()).filesystem(self.root.account)
        else:
            self.fs = LocalFileSystem()

    # --- naming ---------------------------------------------------------------
    def path(self, relative: str) -> str:
        """Path inside the filesystem (what fsspec, pyarrow and DuckDB's registered fs take)."""
        return posixpath.join(self.root.base, relative) if relative else self.root.base

    def uri(self, relative: str) -> str:
        """Full URL for metadata and for readers that know the scheme."""
        if self.root.is_azure:
            return f"abfs://{self.path(relative)}"
        return self.path(relative)

    def reader_path(self, relative: str) -> str:
        """Path a DuckDB connection with this storage's filesystem registered can open."""
        return self.uri(relative)

    # --- reading --------------------------------------------------------------
    def list_files(self, prefix: str, suffix: str = ".parquet") -> list[str]:
        """Relative paths of visible files under ``prefix`` (recursive), sorted."""
        base = self.path(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        out: list[str] = []
        root = self.root.base.rstrip("/") + "/"
        for full in found:
            full = str(full)
            if not full.endswith(suffix) or not is_visible_name(full):
                continue
            out.append(full[len(root) :] if full.startswith(root) else full)
        return sorted(out)

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.path(relative)))

    def size(self, relative: str) -> int:
        return int(self.fs.size(self.path(relative)) or 0)

    def open_read(self, relative: str) -> IO[bytes]:
        return cast(IO[bytes], self.fs.open(self.path(relative), "rb"))

    def delete(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(relative))

    # --- writing --------------------------------------------------------------
    @contextlib.contextmanager
    def atomic_writer(self, relative: str) -> Iterator[IO[bytes]]:
        """A binary file that becomes visible under ``relative`` only if the block exits cleanly."""
        final = self.path(relative)
        if not self.root.is_azure:
            directory = os.path.dirname(final)
            os.makedirs(directory, exist_ok=True)
            temp = os.path.join(directory, f".{os.path.basename(final)}{INPROGRESS_MARKER}{uuid.uuid4().hex}")
            try:
                with open(temp, "wb") as handle:
                    yield handle
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, final)
                _fsync_dir(directory)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(temp)
                raise
            return
        # Azure: blocks are staged as they are written and committed by close(); on failure we
        # discard instead of closing, so no blob (or a previous version) becomes visible.
        handle: Any = self.fs.open(final, "wb")
        try:
            yield cast(IO[bytes], handle)
        except BaseException:
            with contextlib.suppress(Exception):
                handle.discard()
                handle.closed = True  # so garbage collection does not commit it either
            raise
        handle.close()


def _fsync_dir(directory: str) -> None:
    # Makes the rename durable on local disks and NFS; some filesystems refuse, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_.=@:+-]+$")


def safe_segment(value: str) -> str:
    """Validates a path segment built from a key (partition key, table, run id)."""
    if not _SAFE_SEGMENT.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"unsafe path segment {value!r}")
    return value
