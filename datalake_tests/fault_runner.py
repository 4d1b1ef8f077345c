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

from datalake.definitions import build_definitions, build_resources
from datalake.io_managers import BronzeIOManager
from datalake.settings import BRONZE, resolve_settings


class KillAfterWrite(BronzeIOManager):
    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        super().handle_output(context, obj)
        os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, table: str, partition: str) -> None:
    settings = resolve_settings()
    resources = build_resources(settings)
    if mode != "kill-after-write":
        raise SystemExit(f"unknown mode {mode}")
    resources["bronze_io_manager"] = KillAfterWrite(root=settings.root(BRONZE), azure=resources["azure"])  # type: ignore[arg-type]
    defs = build_definitions(settings)
    asset = defs.resolve_assets_def(dg.AssetKey(["bronze", table]))
    with dg.DagsterInstance.get() as instance:
        dg.materialize([asset], resources=resources, instance=instance, partition_key=partition)


if __name__ == "__main__":
    main(*sys.argv[1:4])
