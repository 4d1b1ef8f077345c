"""The code location: assets from the registry, IO managers by role, resources, jobs, schedules.

``defs`` is built lazily by ``@dg.definitions`` when Dagster loads the location, from the
settings the environment resolver produces. Tests call ``build_definitions(settings)``
directly with their own settings; nothing is decided at import time.
"""

from __future__ import annotations

import dagster as dg
from dagster_azure.adls2 import ADLS2DefaultAzureCredential, ADLS2Key, ADLS2SASToken

from datalake.assets.bronze import build_bronze_assets
from datalake.assets.revsci import build_revsci_assets
from datalake.assets.silver import build_silver_assets
from datalake.io_managers import BronzeIOManager, DuckDBPathInputManager, ParquetIOManager
from datalake.lake import DuckDBResource
from datalake.settings import (
    AZURE_ACCOUNT_KEY_VAR,
    AZURE_SAS_TOKEN_VAR,
    BRONZE,
    MYSQL_PASSWORD_VAR,
    SILVER,
    VANGUARD_WHOLESALE,
    Settings,
    resolve_settings,
)
from datalake.source import V3SourceResource
from datalake.specs import load_registry
from datalake.storage import AzureBlobResource
from datalake.watermark import WatermarkResource

BRONZE_JOB = "bronze_job"
SILVER_REVSCI_JOB = "silver_revsci_job"


def azure_resource(settings: Settings) -> AzureBlobResource:
    azure = settings.azure
    credential: ADLS2Key | ADLS2SASToken | ADLS2DefaultAzureCredential = ADLS2DefaultAzureCredential(
        kwargs={}
    )
    if azure.has_account_key:
        credential = ADLS2Key(key=dg.EnvVar(AZURE_ACCOUNT_KEY_VAR))  # type: ignore[arg-type]
    elif azure.has_sas_token:
        credential = ADLS2SASToken(token=dg.EnvVar(AZURE_SAS_TOKEN_VAR))  # type: ignore[arg-type]
    return AzureBlobResource(credential=credential, blob_endpoint=azure.blob_endpoint)


def source_resource(settings: Settings) -> V3SourceResource:
    source = settings.source
    if source.mysql is None:
        return V3SourceResource(
            kind="demo",
            demo_dir=str(source.demo_dir),
            demo_seed=source.demo_seed,
            demo_cdr_rows=source.demo_cdr_rows,
        )
    mysql = source.mysql
    return V3SourceResource(
        kind="mysql",
        host=mysql.host,
        port=mysql.port,
        user=mysql.user,
        password=dg.EnvVar(MYSQL_PASSWORD_VAR) if mysql.has_password else None,  # type: ignore[arg-type]
        ssl_ca=mysql.ssl_ca,
        ssl_cert=mysql.ssl_cert,
        ssl_key=mysql.ssl_key,
    )


def build_resources(settings: Settings) -> dict[str, object]:
    """Role key -> implementation, with the storage root of the environment for each group."""
    azure = azure_resource(settings)
    return {
        "v3_source": source_resource(settings),
        "watermarks": WatermarkResource(),
        "duckdb_resource": DuckDBResource(),
        "azure": azure,
        "bronze_io_manager": BronzeIOManager(root=settings.root(BRONZE), azure=azure),
        "silver_io_manager": ParquetIOManager(root=settings.root(SILVER), azure=azure),
        "revsci_io_manager": ParquetIOManager(root=settings.root(VANGUARD_WHOLESALE), azure=azure),
        "duckdb_path_input_manager": DuckDBPathInputManager(
            bronze_root=settings.root(BRONZE),
            roots={"silver": settings.root(SILVER), "revsci": settings.root(VANGUARD_WHOLESALE)},
            azure=azure,
        ),
    }


def build_definitions(settings: Settings) -> dg.Definitions:
    specs = load_registry(settings.registry_path)
    bronze = build_bronze_assets(specs, settings)
    downstream = [*build_silver_assets(specs), *build_revsci_assets(specs, settings)]
    bronze_job = dg.define_asset_job(
        BRONZE_JOB,
        selection=dg.AssetSelection.groups(BRONZE),
        description="Extract every bronze table for one ingestion date (today = incremental).",
        # Runs that read the V3 source: the run coordinator limits them by this tag.
        tags={"datalake/source": "v3"},
    )
    silver_revsci_job = dg.define_asset_job(
        SILVER_REVSCI_JOB,
        selection=dg.AssetSelection.groups(SILVER, VANGUARD_WHOLESALE),
        description="Rebuild silver and Rev-Sci from the bronze lake.",
    )
    return dg.Definitions(
        assets=[*bronze, *downstream],
        jobs=[bronze_job, silver_revsci_job],
        resources=build_resources(settings),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(resolve_settings())
