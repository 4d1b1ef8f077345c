"""Storage roots for the lake tests: the same test runs on local disk and on Azurite.

``lake_root`` is parametrized: ``local`` is a tmp path; ``azure`` is
``abfs://<container>@devstoreaccount1.dfs.core.windows.net/<unique prefix>`` reached through the
Azurite fixture's blob endpoint with the account key — the code path production uses with ADLS.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from dagster_azure.adls2 import ADLS2Key, ADLS2SASToken

from datalake.azure import AzureBlobResource
from datalake.storage import LakeStorage
from datalake_tests.services import AzuriteServer

CONTAINER = "lake"


@dataclass
class LakeRoot:
    kind: str  # "local" | "azure"
    url: str
    azure: AzureBlobResource | None
    server: AzuriteServer | None = None

    def storage(self) -> LakeStorage:
        return LakeStorage(self.url, self.azure)

    def sub(self, name: str) -> str:
        """A root URL below this one (one per group)."""
        return f"{self.url}/{name}"


def key_resource(
    server: AzuriteServer, duckdb_reader: Literal["arrow", "adlfs"] = "arrow"
) -> AzureBlobResource:
    return AzureBlobResource(
        credential=ADLS2Key(key=server.account_key),
        blob_endpoint=server.blob_endpoint,
        duckdb_reader=duckdb_reader,
    )


def sas_resource(server: AzuriteServer, token: str) -> AzureBlobResource:
    return AzureBlobResource(credential=ADLS2SASToken(token=token), blob_endpoint=server.blob_endpoint)


def ensure_container(server: AzuriteServer, name: str = CONTAINER) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    client = BlobServiceClient.from_connection_string(server.connection_string)
    with contextlib.suppress(ResourceExistsError):
        client.create_container(name)


def azure_url(server: AzuriteServer, prefix: str, container: str = CONTAINER) -> str:
    return f"abfs://{container}@{server.account_name}.dfs.core.windows.net/{prefix}"


def make_root(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> LakeRoot:
    if kind == "local":
        return LakeRoot(kind="local", url=str(tmp_path / "lake"), azure=None)
    server: AzuriteServer = request.getfixturevalue("azurite_server")
    ensure_container(server)
    # A fresh prefix per test: tests share the session's Azurite and container.
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    return LakeRoot(kind="azure", url=azure_url(server, prefix), azure=key_resource(server), server=server)


ROOT_KINDS = [pytest.param("local", id="local"), pytest.param("azure", id="azure", marks=pytest.mark.azurite)]
