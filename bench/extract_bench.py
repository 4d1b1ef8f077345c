"""Extraction benchmark: the same MariaDB CDR table, every tool, one run, side by side.

    make bench                              # everything
    uv run python -m bench extract          # this one
    BENCH_EXTRACT_ROWS=2000000 BENCH_SCALE_ROWS=1000000,10000000 uv run python -m bench extract

Starts a throwaway MariaDB on a free loopback port, seeds the demo V3 source
(billing_cdr: 15 columns incl. DECIMAL, BIGINT UNSIGNED, ENUM, DATETIME(6), TIMESTAMP(6)),
then extracts `v3_billing.billing_cdr` with each tool in its own process, measuring the
extraction wall time (imports and loading the definitions excluded) and the process's peak RSS,
BENCH_EXTRACT_REPEAT times (default 3, interleaved; the median run counts). The raw C client
(`mariadb --quick --batch` to /dev/null) is the protocol limit. Finally this project alone
on 1M and 10M rows, for the memory bound.

    BENCH_EXTRACT_TLS=1 BENCH_SCALE_ROWS= uv run python -m bench extract

runs the same comparison over verified TLS: the server gets a throwaway CA and certificate, and
every tool connects with that CA and checks the host name (this project through
DATALAKE_MYSQL_SSL_CA, i.e. ``verify_identity``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa

from datalake.demo.generator import seed_source
from datalake.demo.schema import create_schemas, drop_schemas, metadata
from datalake_tests.services import MariaDBServer, start_mariadb
from datalake_tests.tls import make_pki

RESULTS = Path(__file__).parent / "results"
REPEAT = int(os.environ.get("BENCH_EXTRACT_REPEAT", "3"))
TLS = os.environ.get("BENCH_EXTRACT_TLS", "").lower() in ("1", "true", "yes")
TARGETS = {
    "vs_connectorx_rows_per_s": 1.0,  # >=
    "vs_dlt_rows_per_s": 10.0,  # >=
    "vs_raw_client_wall": 1.5,  # <=
    "rss_10m_over_1m": 1.2,  # <=
    "rss_10m_mb": 250.0,  # <=
}


@dataclass
class Measure:
    tool: str
    rows: int
    seconds: float  # extraction wall (imports excluded; whole process for the raw client)
    process_seconds: float
    peak_rss_mb: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float]:
    """Runs a command; returns (stdout, wall seconds, the child's peak RSS in MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    # wait4 gives this child's own rusage: its peak RSS, not the bench process's.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{err[-3000:]}")
    return out, wall, usage.ru_maxrss / 1024


def tool(
    name: str,
    url: str,
    schema: str,
    table: str,
    work: Path,
    env: dict[str, str] | None = None,
    *,
    keep: bool = False,
) -> Measure:
    """One tool's extraction in its own process; ``keep``: leave its output in ``out_dir(...)``."""
    out_dir = tool_out_dir(name, table, work)
    out, wall, rss = run_measured(
        [sys.executable, "-m", "bench.extract_tools", name, url, schema, table, str(out_dir)],
        env={**os.environ, **env} if env else None,
    )
    result = json.loads(out.strip().splitlines()[-1])
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return Measure(name, int(result["rows"]), float(result["seconds"]), wall, rss)


def tool_out_dir(name: str, table: str, work: Path) -> Path:
    return work / f"{name}-{table}"


def raw_client(server: MariaDBServer, schema: str, table: str, ca: Path | None) -> Measure:
    client = shutil.which("mariadb") or shutil.which("mysql")
    if client is None:
        raise RuntimeError("no mariadb/mysql client on PATH")
    cmd = [
        client, "--no-defaults", "--quick", "--batch", "-h", server.host, "-P", str(server.port),
        "-u", server.user, f"-p{server.password}", "-e", f"SELECT * FROM {schema}.{table}",
        *([f"--ssl-ca={ca}", "--ssl-verify-server-cert"] if ca else []),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("raw client failed")
    rows = _count(server, schema, table)
    return Measure("mariadb --quick (raw C client)", rows, wall, wall, usage.ru_maxrss / 1024)


def _count(server: MariaDBServer, schema: str, table: str) -> int:
    engine = sa.create_engine(server.url())
    with engine.connect() as conn:
        count = conn.exec_driver_sql(f"SELECT COUNT(*) FROM {schema}.{table}").scalar_one()
    engine.dispose()
    return int(count)


def _scaled_copy(server: MariaDBServer, rows: int, name: str) -> None:
    """A billing_cdr copy with ``rows`` rows (new ids), built server-side."""
    engine = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS v3_billing.{name}")
        conn.exec_driver_sql(f"CREATE TABLE v3_billing.{name} LIKE v3_billing.billing_cdr")
        have = conn.exec_driver_sql("SELECT COUNT(*) FROM v3_billing.billing_cdr").scalar_one()
        copies = -(-rows // have)
        for i in range(copies):
            take = min(have, rows - i * have)
            conn.exec_driver_sql(
                f"INSERT INTO v3_billing.{name} SELECT cdr_id + {i * have}, subscription_id, customer_id, "
                "partner_id, call_type, started_at, duration_seconds, bytes_used, cost, origin, destination, "
                f"cell_id, is_roaming, created_at FROM v3_billing.billing_cdr ORDER BY cdr_id LIMIT {take}"
            )
    engine.dispose()


def main() -> None:
    rows = int(os.environ.get("BENCH_EXTRACT_ROWS", "2000000"))
    scale = [int(x) for x in os.environ.get("BENCH_SCALE_ROWS", "1000000,10000000").split(",") if x]
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    pki = make_pki(work / "pki") if TLS else None
    server = start_mariadb(work / "mariadb", tls=pki)
    try:
        engine = sa.create_engine(server.url())
        drop_schemas(engine)
        create_schemas(engine)
        metadata.create_all(engine)
        print(f"seeding {rows:,} CDRs ...", flush=True)
        seed_source(engine, seed=1, cdr_rows=rows)
        engine.dispose()
        # With TLS every tool gets the CA through the URL (SQLAlchemy passes ssl_ca to PyMySQL).
        url = server.url() + (f"&ssl_ca={quote(str(pki.ca), safe='')}" if pki else "")
        # Each tool REPEAT times, interleaved (so drift on a shared machine hits every tool alike);
        # the median run of each counts.
        runs: dict[str, list[Measure]] = {}
        for round_ in range(REPEAT):
            for name in ("project", "project-2-streams", "connectorx", "dlt", "pandas", "raw"):
                print(f"  round {round_ + 1}/{REPEAT}: {name} ...", flush=True)
                measure = (
                    raw_client(server, "v3_billing", "billing_cdr", pki.ca if pki else None)
                    if name == "raw"
                    else tool(name, url, "v3_billing", "billing_cdr", work)
                )
                runs.setdefault(name, []).append(measure)
        measures = [_median(ms) for ms in runs.values()]
        by = {m.tool: m for m in measures}
        ours = by["project"]
        print(
            f"\nExtract v3_billing.billing_cdr ({rows:,} rows, 15 columns) to Parquet, MariaDB on loopback"
            f"{', verified TLS' if pki else ''}:\n"
        )
        print(
            f"  {'tool':<34} {'rows/s':>12} {'extract s':>10} {'process s':>10} {'peak RSS MB':>12} {'ours is':>10}"
        )
        for m in measures:
            ratio = ours.rows_per_s / m.rows_per_s if m.rows_per_s else float("nan")
            print(
                f"  {m.tool:<34} {m.rows_per_s:>12,.0f} {m.seconds:>10.2f} {m.process_seconds:>10.2f} "
                f"{m.peak_rss_mb:>12.0f} {ratio:>9.2f}x"
            )
        scaled: list[Measure] = []
        for n in scale:
            name = f"cdr_{n}"
            print(f"\n  building {n:,}-row copy ...", flush=True)
            _scaled_copy(server, n, name)
            scaled.append(tool("project", url, "v3_billing", name, work))
        ratios = {
            "vs_connectorx_rows_per_s": ours.rows_per_s / by["connectorx"].rows_per_s,
            "vs_dlt_rows_per_s": ours.rows_per_s / by["dlt"].rows_per_s,
            "vs_raw_client_wall": ours.seconds / by["mariadb --quick (raw C client)"].seconds,
        }
        if len(scaled) >= 2:
            ratios["rss_10m_over_1m"] = scaled[-1].peak_rss_mb / scaled[0].peak_rss_mb
            ratios["rss_10m_mb"] = scaled[-1].peak_rss_mb
            print("\n  this project, peak RSS by table size:")
            for m in scaled:
                print(f"    {m.rows:>12,} rows: {m.peak_rss_mb:6.0f} MB, {m.rows_per_s:,.0f} rows/s")
        print("\n  targets:")
        for key, value in ratios.items():
            target = TARGETS[key]
            sense = _sense(key)
            ok = value >= target if sense == ">=" else value <= target
            print(f"    {key:<26} {value:8.2f}  target {sense} {target:<6} {'met' if ok else 'NOT met'}")
        two = by["project-2-streams"]
        print(
            f"\n  DATALAKE_EXTRACT_STREAMS=2 (not the default): {two.rows_per_s / by['connectorx'].rows_per_s:.2f}x "
            f"connectorx's rows/s at {two.peak_rss_mb:.0f} MB (the default: {ours.peak_rss_mb:.0f} MB)"
        )
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / ("extract-tls.json" if pki else "extract.json")).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "tls": pki is not None,
                    "repeat": REPEAT,
                    "runs": {name: [asdict(m) for m in ms] for name, ms in runs.items()},
                    "measures": [asdict(m) for m in measures],
                    "scaled": [asdict(m) for m in scaled],
                    "ratios": ratios,
                },
                indent=2,
            )
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _median(measures: list[Measure]) -> Measure:
    """The run with the median extraction time (its own RSS), for a tool measured several times."""
    ordered = sorted(measures, key=lambda m: m.seconds)
    return ordered[len(ordered) // 2]


def _sense(key: str) -> str:
    return ">=" if key in ("vs_connectorx_rows_per_s", "vs_dlt_rows_per_s") else "<="


if __name__ == "__main__":
    main()
