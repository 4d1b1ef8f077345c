"""Runs one bronze asset with a fault injected around the real bronze IO manager.

    python -m datalake_tests.fault_runner kill-after-write TABLE PARTITION

Settings come from the environment (the resolver); the instance from DAGSTER_HOME.
`kill-after-write`: the process SIGKILLs itself right after the IO manager has put the file
in the lake and returned — before Dagster records the materialization (the watermark commit).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import dagster as dg

from datalake.assets.bronze import build_bronze_asset
from datalake.definitions import build_resources
from datalake.io_managers import BronzeIOManager
from datalake.settings import BRONZE, resolve_settings
from datalake.specs import load_registry


class KillAfterWrite(BronzeIOManager):
    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        super().handle_output(context, obj)
        os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, table: str, partition: str) -> None:
    settings = resolve_settings()
    resources = build_resources(settings)
    if mode != "kill-after-write":
        raise SystemExit(f"unknown mode {mode}")
    resources["bronze_io_manager"] = KillAfterWrite(root=settings.root(BRONZE), azure=resources.get("azure"))  # type: ignore[arg-type]
    # The bare asset (resources are passed below), as the code location builds it.
    spec = next(s for s in load_registry(settings.registry_path) if s.asset_name == table)
    asset = build_bronze_asset(spec, settings)
    with dg.DagsterInstance.get() as instance:
        dg.materialize([asset], resources=resources, instance=instance, partition_key=partition)


if __name__ == "__main__":
    main(*sys.argv[1:4])
