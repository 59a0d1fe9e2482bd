"""Catalog designs at scale (issue 9): memory, start-up and query latency, measured before choosing.

Each design answers the same query set through the real query engine (``parse_qido`` ->
``run_query_json``, as the QIDO-RS route does), in a process of its own, so its resident
memory (VmRSS / VmHWM from /proc) and its start-up are its own:

* ``memory``: today's CatalogReader, an in-memory DuckDB copy of every current instance row.
* ``parquet-<N>``: compact ``studies`` and ``series`` tables in memory; instance rows read
  on demand from one Parquet file sorted by study_instance_uid (row groups of N rows; DuckDB
  ``read_parquet`` prunes row groups on their min/max statistics), headers from the same file.
* ``duckdb-file``: a DuckDB database file opened read-only with ``memory_limit``, tables
  sorted by their search key (studies by study_date, series and instances by study UID), so
  zone maps skip what a query cannot match; headers in the instances table.
* ``hybrid``: ``studies`` and ``series`` copied into memory from that file at start-up,
  ``instances`` (with headers) read from it on demand.

The archive comes from bench/catalog_synth.py (``--big-every 50`` gives the 500-instance
studies the metadata query needs); ``prepare`` derives each design's files from its batch
files (what a compaction asset would write); ``run`` measures and prints the table.

    nice .venv/bin/python bench/catalog_synth.py catalog --instances 1000000 --big-every 50 \\
        --data-dir /tmp/vhc-bench/a1m
    nice .venv/bin/python bench/catalog_design.py prepare --archive /tmp/vhc-bench/a1m
    nice .venv/bin/python bench/catalog_design.py run --archive /tmp/vhc-bench/a1m \\
        --instances 1000000 --json bench/out/catalog_design_1m.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from catalog_synth import BIG_STUDY, plan_archive

# The start-up figure counts from here (the stdlib is loaded): the catalog stack's imports
# (DuckDB, pyarrow, the query engine) and opening the design.
START = time.monotonic()

ROW_GROUPS = (10_000, 100_000)
DESIGNS = ("serving", *(f"parquet-{n}" for n in ROW_GROUPS), "duckdb-file", "hybrid")
MEMORY_LIMIT = "256MB"
REPEATS = 30
KINDS = (
    "PatientID",
    "PatientName=X* limit=101",
    "StudyDate (1 month)",
    "AccessionNumber",
    "ModalitiesInStudy limit=101",
    "series of a study",
    "instances of a study",
    f"metadata ({BIG_STUDY}-instance study)",
)
_INSTANCE_ORDER = "study_instance_uid, series_instance_uid, instance_number, sop_instance_uid"


def _prepared(archive: Path) -> Path:
    return archive / "designs"


def _rss() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process, in MiB."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found


# --------------------------------------------------------------------------- prepare


def prepare(archive: Path) -> None:
    """Write every design's files under <archive>/designs (idempotent: rebuilt each time)."""
    import duckdb

    from vannah_pipelines.catalog.schema import current_select, series_select, study_select

    out = _prepared(archive)
    out.mkdir(exist_ok=True)
    for stale in out.glob("*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    glob = str(archive / "catalog" / "instances" / "*" / "*.parquet")
    started = time.monotonic()
    con = duckdb.connect(str(out / "work.duckdb"))
    con.execute("SET memory_limit = '4GB'")
    con.execute("SET threads = 2")
    con.execute(f"SET temp_directory = '{out / 'tmp'}'")
    source = f"(SELECT *, '' AS source_file FROM read_parquet('{glob}'))"
    con.execute(f"CREATE TABLE instances AS {current_select(source)} ORDER BY {_INSTANCE_ORDER}")
    con.execute(f"CREATE TABLE series AS {series_select('instances')} ORDER BY study_instance_uid")
    con.execute(f"CREATE TABLE studies AS {study_select('instances')} ORDER BY study_date")
    print(f"current rows: {time.monotonic() - started:.1f} s", file=sys.stderr)
    for table in ("studies", "series"):
        con.execute(f"COPY {table} TO '{out / table}.parquet' (FORMAT parquet)")
    for n in ROW_GROUPS:
        con.execute(
            f"COPY (SELECT * EXCLUDE (source_file) FROM instances) TO "
            f"'{out}/instances_rg{n}.parquet' "
            f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {n})"
        )
    con.execute(f"ATTACH '{out / 'catalog.duckdb'}' AS disk")
    for table in ("instances", "series", "studies"):
        con.execute(f"CREATE TABLE disk.{table} AS SELECT * FROM {table}")
    con.execute("DETACH disk")
    con.close()
    (out / "work.duckdb").unlink()
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.*"))}
    print(f"prepared in {time.monotonic() - started:.1f} s: {sizes}", file=sys.stderr)


# --------------------------------------------------------------------------- designs


class DuckCatalog:
    """A DuckDB connection with ``instances``, ``series`` and ``studies`` relations, shaped
    like CatalogReader for the query engine (query, column_types, headers)."""

    def __init__(self, con: Any) -> None:
        self._con = con
        self._types: dict[str, dict[str, str]] = {}
        for table, column, type_ in con.execute(
            "SELECT table_name, column_name, data_type FROM duckdb_columns()"
        ).fetchall():
            self._types.setdefault(table, {})[column] = type_
        for view in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal"
        ).fetchall():
            names = con.execute(f"DESCRIBE {view[0]}").fetchall()
            self._types[view[0]] = {r[0]: r[1] for r in names}

    def column_types(self, table: str) -> dict[str, str]:
        return self._types[table]

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        cursor = self._con.cursor()
        try:
            rows: list[tuple[Any, ...]] = cursor.execute(sql, list(params or [])).fetchall()
            return rows
        finally:
            cursor.close()

    def headers(self, rows: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str], str]:
        wanted = sorted({r[1] for r in rows})
        found = self.query(
            "SELECT sop_instance_uid, checksum, header_json FROM instances "
            "WHERE sop_instance_uid IN (SELECT unnest(?))",
            [wanted],
        )
        return {(sop, sha): header for sop, sha, header in found}

    def metadata(self, study_uid: str) -> list[str]:
        """Header JSON of a study's instances, from the instance rows (one sorted read)."""
        rows = self.query(
            f"SELECT header_json FROM instances WHERE study_instance_uid = ? "
            f"ORDER BY {_INSTANCE_ORDER}",
            [study_uid],
        )
        return [r[0] for r in rows]


def open_design(design: str, archive: Path) -> tuple[Any, Callable[[str], list[str]]]:
    """The design's catalog (for run_query_json) and its study-metadata function."""
    import duckdb

    out = _prepared(archive)
    if design == "serving":  # what the services run: compacted serving database + overlay
        from vannah_pipelines.catalog.lookup import iter_headers
        from vannah_pipelines.catalog.reader import CatalogReader

        reader = CatalogReader(archive / "catalog", memory_limit_mb=int(MEMORY_LIMIT[:-2]))
        return reader, lambda study: [h for _, h in iter_headers(reader, study)]
    if design.startswith("parquet-"):
        con = duckdb.connect(":memory:")
        con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
        con.execute("SET parquet_metadata_cache = true")
        for table in ("studies", "series"):
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM '{out / table}.parquet'")
        path = out / f"instances_rg{design.split('-')[1]}.parquet"
        con.execute(
            "CREATE VIEW instances AS SELECT *, filename AS source_file "
            f"FROM read_parquet('{path}', filename = true)"
        )
        catalog = DuckCatalog(con)
        return catalog, catalog.metadata
    if design == "duckdb-file":
        con = duckdb.connect(
            str(out / "catalog.duckdb"),
            read_only=True,
            config={"memory_limit": MEMORY_LIMIT},
        )
        catalog = DuckCatalog(con)
        return catalog, catalog.metadata
    if design == "hybrid":
        con = duckdb.connect(":memory:", config={"memory_limit": MEMORY_LIMIT})
        con.execute(f"ATTACH '{out / 'catalog.duckdb'}' AS disk (READ_ONLY)")
        for table in ("studies", "series"):
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM disk.{table}")
        con.execute("CREATE VIEW instances AS SELECT * FROM disk.instances")
        catalog = DuckCatalog(con)
        return catalog, catalog.metadata
    raise SystemExit(f"unknown design {design}")


# --------------------------------------------------------------------------- queries


def query_set(instances: int, seed: int = 7) -> dict[str, list[Any]]:
    """REPEATS varied values per query kind, from the archive's plan."""
    plan = plan_archive(instances, big_every=50)
    rng = random.Random(seed)
    studies = rng.sample(plan, REPEATS)
    big = [s for s in plan if sum(s.series_sizes) == BIG_STUDY]
    initials = sorted({s.patient_name[0] for s in plan})
    months = [(y, m) for y in range(2019, 2024) for m in range(1, 13)]
    return {
        KINDS[0]: [{"PatientID": s.patient_id} for s in studies],
        KINDS[1]: [
            {"PatientName": f"{initials[i % len(initials)]}*", "limit": "101"}
            for i in range(REPEATS)
        ],
        KINDS[2]: [
            {"StudyDate": f"{y}{m:02d}01-{y}{m:02d}28"} for y, m in rng.sample(months, REPEATS)
        ],
        KINDS[3]: [{"AccessionNumber": f"ACC{s.index:08d}"} for s in studies],
        KINDS[4]: [
            {"ModalitiesInStudy": ("CT", "MR")[i % 2], "limit": "101"} for i in range(REPEATS)
        ],
        KINDS[5]: [s.study_uid for s in studies],
        KINDS[6]: [s.study_uid for s in studies],
        KINDS[7]: [s.study_uid for s in rng.sample(big, min(REPEATS, len(big)))],
    }


def child(design: str, archive: Path, instances: int) -> dict[str, Any]:
    """Open `design`, measure, return the figures (run in a process of its own)."""
    import duckdb  # noqa: F401  (the catalog stack: counted in the start-up)

    from dicomweb.qido_params import parse_qido
    from vannah_pipelines.catalog.query import run_query_json
    from vannah_pipelines.dicom.keys import Level

    import_s = time.monotonic() - START
    queries = query_set(instances)  # not counted: the plan is the benchmark's, not the design's
    opened = time.monotonic()
    catalog, metadata = open_design(design, archive)
    open_s = time.monotonic() - opened
    rss_start = _rss()

    def qido(level: Level, params: dict[str, str], scope: dict[str, str] | None = None) -> int:
        spec, _ = parse_qido(params.items(), level, max_limit=1_000_000, scope=scope)
        return run_query_json(catalog, spec, retrieve_base="http://h/dicom-web").count

    runs: dict[str, Callable[[Any], int]] = {
        KINDS[5]: lambda uid: qido(Level.SERIES, {}, {"StudyInstanceUID": uid}),
        KINDS[6]: lambda uid: qido(Level.IMAGE, {}, {"StudyInstanceUID": uid}),
        KINDS[7]: lambda uid: len(metadata(uid)),
    }
    latencies: dict[str, dict[str, float]] = {}
    for kind, values in queries.items():
        run = runs.get(kind, lambda params: qido(Level.STUDY, params))
        run(values[-1])  # warm-up
        times, counts = [], []
        for value in values:
            t = time.perf_counter()
            counts.append(run(value))
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        latencies[kind] = {
            "p50": statistics.median(times),
            "p95": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
            "answers": statistics.median(counts),
        }
    return {
        "design": design,
        "import_s": import_s,
        "open_s": open_s,
        "rss_start_mib": rss_start["VmRSS"],
        "rss_end_mib": _rss()["VmRSS"],
        "hwm_mib": _rss()["VmHWM"],
        "latency_ms": latencies,
    }


# --------------------------------------------------------------------------- run


def run(archive: Path, instances: int, designs: Sequence[str]) -> list[dict[str, Any]]:
    results = []
    for design in designs:
        started = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "child",
                design,
                "--archive",
                str(archive),
                "--instances",
                str(instances),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            print(f"{design}: failed\n{proc.stderr}", file=sys.stderr)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.monotonic() - started
        results.append(result)
        print(f"{design}: done in {result['wall_s']:.1f} s", file=sys.stderr)
    return results


def table(results: list[dict[str, Any]], instances: int) -> str:
    head = ["measure", *(r["design"] for r in results)]
    lines: list[list[str]] = [
        ["start-up: imports + open (s)", *(f"{r['import_s'] + r['open_s']:.2f}" for r in results)],
        ["RSS after start (MiB)", *(f"{r['rss_start_mib']:.0f}" for r in results)],
        ["RSS after queries (MiB)", *(f"{r['rss_end_mib']:.0f}" for r in results)],
        ["peak RSS (MiB)", *(f"{r['hwm_mib']:.0f}" for r in results)],
    ]
    for kind in KINDS:
        cells = []
        for r in results:
            lat = r["latency_ms"][kind]
            cells.append(f"{lat['p50']:.1f} / {lat['p95']:.1f}")
        answers = int(results[0]["latency_ms"][kind]["answers"]) if results else 0
        lines.append([f"{kind} p50/p95 ms ({answers} ans.)", *cells])
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    out = [f"{instances:,} instances"]
    for row in [head, ["-" * w for w in widths], *lines]:
        out.append(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "run", "child"):
        p = sub.add_parser(name)
        p.add_argument("--archive", type=Path, required=True)
        if name != "prepare":
            p.add_argument("--instances", type=int, required=True)
    sub.choices["run"].add_argument("--designs", nargs="+", default=list(DESIGNS))
    sub.choices["run"].add_argument("--json", type=Path)
    sub.choices["child"].add_argument("design", choices=DESIGNS)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.archive)
    elif args.command == "child":
        print(json.dumps(child(args.design, args.archive, args.instances)))
    else:
        results = run(args.archive, args.instances, args.designs)
        print(table(results, args.instances))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
