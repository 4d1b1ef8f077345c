"""Azure access for lake roots: dagster-azure credential configs, the blob endpoint, adlfs and polars.

Imported only where a root is on Azure (``datalake.definitions`` wires it then; ``LakeStorage``
falls back to DefaultAzureCredential), so local and NFS deployments never load the Azure SDK.
"""

from __future__ import annotations

import threading
from typing import Any, Literal
from urllib.parse import urlparse

import dagster as dg
import fsspec
from dagster_azure.adls2 import ADLS2DefaultAzureCredential, ADLS2Key, ADLS2SASToken
from pydantic import Field, PrivateAttr

from datalake.settings import AZURE_ACCOUNT_KEY_VAR, AZURE_SAS_TOKEN_VAR, Settings
from datalake.storage import AZURE_BLOCK_SIZE, ArrowReads, AzureAccess


def _account_from_endpoint(endpoint: str) -> str | None:
    """The account a blob endpoint serves: ``http://host:port/<account>`` (emulator) or ``https://<account>.blob…``."""
    parsed = urlparse(endpoint)
    first = parsed.path.strip("/").split("/")[0]
    if first:
        return first
    return (parsed.hostname or "").split(".")[0] or None


class AzureBlobResource(AzureAccess):
    """Credentials for Azure roots, as dagster-azure credential configs (values via ``EnvVar``).

    ``blob_endpoint`` overrides ``https://<account>.blob.core.windows.net`` — for the Azurite
    emulator (``http://127.0.0.1:10000/devstoreaccount1``) or a sovereign cloud.

    One filesystem per account for the resource's life (a run, or a step in its own process):
    every input, output and listing on that account shares its client and its credential, so a
    step with several inputs fetches one token (DefaultAzureCredential), not one per input.

    DuckDB reads through Arrow's C++ Azure client (``duckdb_reader="arrow"``, see
    ``storage.ArrowReads``) with the same credential, where it can take it: an account key, a SAS,
    or DefaultAzureCredential without Python-SDK options, on the default endpoint or a path-style
    one (``http://host:port/<account>``, the emulator). Otherwise, or with ``"adlfs"``, it reads
    through the adlfs filesystem.
    """

    # DefaultAzureCredential (managed identity, workload identity, az login) unless a key or SAS is given.
    # repr=False: a resource's repr (an f-string in a log line, an error) must not carry the key.
    credential: ADLS2Key | ADLS2SASToken | ADLS2DefaultAzureCredential = Field(
        default=ADLS2DefaultAzureCredential(kwargs={}), discriminator="credential_type", repr=False
    )
    blob_endpoint: str | None = None
    account_name: str | None = None
    duckdb_reader: Literal["arrow", "adlfs"] = "arrow"
    _filesystems: dict[str, fsspec.AbstractFileSystem] = PrivateAttr(default_factory=dict)
    _scan_filesystems: dict[str, fsspec.AbstractFileSystem] = PrivateAttr(default_factory=dict)
    _filesystems_lock: threading.RLock = PrivateAttr(default_factory=threading.RLock)

    def account(self, root_account: str | None) -> str:
        account = (
            root_account
            or self.account_name
            or (_account_from_endpoint(self.blob_endpoint) if self.blob_endpoint else None)
        )
        if not account:
            raise ValueError(
                "Azure root has no account: use abfs://container@account.dfs.core.windows.net/... "
                "or configure the blob endpoint"
            )
        return account

    def _sas(self) -> str | None:
        credential = self.credential
        if isinstance(credential, ADLS2SASToken) and credential.token:
            return credential.token.lstrip("?")
        return None

    def filesystem(self, root_account: str | None = None) -> fsspec.AbstractFileSystem:
        """The adlfs filesystem of the root's account on the blob endpoint: writes, listings, footers."""
        account = self.account(root_account)
        with self._filesystems_lock:
            if account not in self._filesystems:
                self._filesystems[account] = self._new_filesystem(account)
            return self._filesystems[account]

    def scan_filesystem(self, root_account: str | None = None) -> fsspec.AbstractFileSystem:
        """What DuckDB reads the account's files through: Arrow's Azure client where it can be used."""
        account = self.account(root_account)
        with self._filesystems_lock:
            if account not in self._scan_filesystems:
                arrow = self._arrow_filesystem(account) if self.duckdb_reader == "arrow" else None
                key = self.credential.key if isinstance(self.credential, ADLS2Key) else None
                secrets = (self._sas() or "", key or "")
                self._scan_filesystems[account] = (
                    ArrowReads(arrow, secrets) if arrow else self.filesystem(account)
                )
            return self._scan_filesystems[account]

    def _arrow_filesystem(self, account: str) -> Any:
        """pyarrow's AzureFileSystem with this resource's credential, or None where it cannot take it."""
        try:
            from pyarrow.fs import AzureFileSystem
        except ImportError:  # a pyarrow build without Azure
            return None
        credential = self.credential
        kwargs: dict[str, Any] = {}
        if isinstance(credential, ADLS2Key) and credential.key:
            kwargs["account_key"] = credential.key
        elif isinstance(credential, ADLS2SASToken) and self._sas():
            # Arrow appends the token to the account URL as given: with its '?' (or it becomes a path).
            kwargs["sas_token"] = f"?{self._sas()}"
        elif not isinstance(credential, ADLS2DefaultAzureCredential) or credential.kwargs:
            return None  # DefaultAzureCredential options are the Python SDK's; Arrow's C++ chain has none
        if self.blob_endpoint:
            endpoint = urlparse(self.blob_endpoint)
            if not endpoint.path.strip("/"):
                return None  # https://<account>.blob.<cloud>: Arrow would need the suffix alone
            # Path-style (emulator): Arrow addresses <scheme>://<authority>/<account>/.
            for service in ("blob", "dfs"):
                kwargs[f"{service}_storage_authority"] = endpoint.netloc
                kwargs[f"{service}_storage_scheme"] = endpoint.scheme
        return AzureFileSystem(account, **kwargs)

    def _new_filesystem(self, account: str) -> fsspec.AbstractFileSystem:
        import adlfs  # imported lazily: the azure SDK is slow to import and local runs don't need it

        credential = self.credential
        kwargs: dict[str, Any] = {
            "account_name": account,
            "blocksize": AZURE_BLOCK_SIZE,
            # Shared by every reader and writer of the account for the resource's life: a cached
            # listing would hide files other runs commit meanwhile.
            "use_listings_cache": False,
        }
        endpoint = self.blob_endpoint.rstrip("/") if self.blob_endpoint else None
        if not isinstance(credential, ADLS2DefaultAzureCredential):
            # A key or SAS as a connection string, always: it is the only adlfs input that takes an
            # endpoint URL (its account_host is https-only; Azurite speaks http), and adlfs takes
            # what it is not given from AZURE_STORAGE_* variables — a connection string there
            # (another tool's) had this resource write to another account.
            endpoint = endpoint or f"https://{account}.blob.core.windows.net"
            parts = [f"DefaultEndpointsProtocol={urlparse(endpoint).scheme}", f"AccountName={account}"]
            if isinstance(credential, ADLS2Key) and credential.key:
                parts.append(f"AccountKey={credential.key}")
            sas = self._sas()
            if sas:
                parts.append(f"SharedAccessSignature={sas}")
            parts.append(f"BlobEndpoint={endpoint}")
            kwargs["connection_string"] = ";".join(parts) + ";"
        else:
            from azure.identity.aio import DefaultAzureCredential

            kwargs["credential"] = DefaultAzureCredential(**credential.kwargs)
            if endpoint:
                # Token credentials need TLS, so only an https endpoint (sovereign cloud) makes sense.
                parsed = urlparse(endpoint)
                if parsed.scheme != "https":
                    raise ValueError("DefaultAzureCredential needs an https blob endpoint")
                kwargs["account_host"] = parsed.netloc + parsed.path
        # skip_instance_cache: fsspec's process-wide cache keys by arguments, and this resource's
        # credential is its own; the resource caches its filesystems itself (``filesystem``).
        fs = adlfs.AzureBlobFileSystem(skip_instance_cache=True, **kwargs)
        if "credential" in kwargs and (fs.connection_string or fs.account_key or fs.sas_token):
            # Taken from AZURE_STORAGE_* variables, and adlfs prefers them to the credential.
            fs.connection_string = fs.account_key = fs.sas_token = None
            fs.do_connect()
        return fs

    def polars_storage_options(self, root_account: str | None = None) -> dict[str, str]:
        """``storage_options`` for polars' native (object_store) Azure reader: lazy scans on Azure.

        DefaultAzureCredential: no secret here; polars' ``credential_provider='auto'`` picks it up.
        """
        options = {"account_name": self.account(root_account)}
        credential = self.credential
        if isinstance(credential, ADLS2Key) and credential.key:
            options["account_key"] = credential.key
        sas = self._sas()
        if sas:
            options["sas_token"] = sas
        if self.blob_endpoint:
            options["endpoint"] = self.blob_endpoint.rstrip("/")
            if urlparse(self.blob_endpoint).scheme == "http":
                options["allow_http"] = "true"
        return options


def azure_resource(settings: Settings) -> AzureBlobResource:
    """The environment's Azure credentials: an account key or SAS token via ``EnvVar``, else DefaultAzureCredential."""
    azure = settings.azure
    credential: ADLS2Key | ADLS2SASToken | ADLS2DefaultAzureCredential = ADLS2DefaultAzureCredential(
        kwargs={}
    )
    if azure.has_account_key:
        credential = ADLS2Key(key=dg.EnvVar(AZURE_ACCOUNT_KEY_VAR))  # type: ignore[arg-type]
    elif azure.has_sas_token:
        credential = ADLS2SASToken(token=dg.EnvVar(AZURE_SAS_TOKEN_VAR))  # type: ignore[arg-type]
    return AzureBlobResource(
        credential=credential,
        blob_endpoint=azure.blob_endpoint,
        duckdb_reader="adlfs" if azure.duckdb_reader == "adlfs" else "arrow",
    )
