"""``python -m datalake.demo``: seed, mutate or fingerprint a demo V3 source.

python -m datalake.demo seed --sqlite-dir tmp/v3 --seed 42 --cdr-rows 20000
python -m datalake.demo seed --url mysql+pymysql://user:pw@host:3306/ --cdr-rows 10000000 --drop
python -m datalake.demo mutate --url mysql+pymysql://user:pw@host:3306/ --seed 42 --round 1
python -m datalake.demo checksum --sqlite-dir tmp/v3
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from datalake.demo import generator, schema


def _engine(args: argparse.Namespace) -> sa.Engine:
    if args.url:
        return schema.mysql_engine(args.url)
    return schema.sqlite_engine(Path(args.sqlite_dir))


def _timestamp(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO timestamp: {value!r}") from exc


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datalake.demo", description="Seed, mutate or fingerprint the demo V3 source."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def target(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--url", help="SQLAlchemy URL of a MySQL/MariaDB server (mysql+pymysql://...)")
        group.add_argument("--sqlite-dir", help="directory of the embedded SQLite source")

    seed = sub.add_parser("seed", help="create the tables and fill them with 30 days of data")
    target(seed)
    seed.add_argument("--seed", type=int, default=42)
    seed.add_argument("--cdr-rows", type=int, default=20_000)
    seed.add_argument("--anchor", type=_timestamp, help="end of the 30-day window (default: today 00:00 UTC)")
    seed.add_argument("--drop", action="store_true", help="drop the existing demo schemas first")

    mutate = sub.add_parser("mutate", help="one round of inserts, updates and deletes")
    target(mutate)
    mutate.add_argument("--seed", type=int, required=True)
    mutate.add_argument("--round", type=int, default=1)
    mutate.add_argument("--now", type=_timestamp, help="timestamp of the changes (default: wall clock, UTC)")

    check = sub.add_parser("checksum", help="order-independent checksum of every table")
    target(check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    engine = _engine(args)
    started = time.monotonic()
    try:
        if args.command == "seed":
            if args.drop:
                schema.drop_schemas(engine)
            counts = generator.seed_source(
                engine, seed=args.seed, cdr_rows=args.cdr_rows, anchor=args.anchor, log=_log
            )
            for key, rows in counts.items():
                print(f"{key:40} {rows:>12,}")
        elif args.command == "mutate":
            changes = generator.mutate(engine, seed=args.seed, round=args.round, now=args.now)
            print(f"{'table':40} {'inserted':>10} {'updated':>10} {'deleted':>10}")
            for key, c in changes.items():
                print(f"{key:40} {c['inserted']:>10,} {c['updated']:>10,} {c['deleted']:>10,}")
        else:
            for key, value in generator.checksums(engine).items():
                print(f"{key:40} {value}")
    except RuntimeError as exc:  # e.g. seeding a source that already has rows
        _log(f"error: {exc}")
        return 1
    finally:
        engine.dispose()
    _log(f"done in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
