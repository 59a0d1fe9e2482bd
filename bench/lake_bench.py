"""The DuckLake catalog on real servers (PostgreSQL + SeaweedFS on loopback): append and query
costs, cross-process visibility, concurrent writers.

    .venv/bin/python bench/lake_bench.py --instances 200000 --batches 10

Rows come from bench/catalog_synth.py's plan (written as local batch files first, then each
file appended to the lake as one batch).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from catalog_synth import plan_archive, write_catalog

from tests.servers import postgres_server, seaweedfs_server
from vannah_pipelines.catalog.lake import (
    INSTANCE_VERSIONS,
    LakeConfig,
    append_batch,
    attach_lake,
    ensure_tables,
    open_reader,
)
from vannah_pipelines.catalog.lookup import iter_headers
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.catalog.schema import current_select, study_select

BUCKET = "vannah-bench"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _rebatch(rows: pa.Table, batch_id: str) -> pa.Table:
    index = rows.schema.get_field_index("batch_id")
    return rows.set_column(index, "batch_id", pa.array([batch_id] * rows.num_rows))


def _append_worker(config: LakeConfig, batch_id: str, path: str, start: float) -> str:
    rows = _rebatch(pq.read_table(path), batch_id)
    con = attach_lake(config)
    while time.time() < start:
        time.sleep(0.005)
    began = time.monotonic()
    try:
        done = append_batch(con, config, batch_id, {INSTANCE_VERSIONS: rows})
        return f"{batch_id}: appended={done} in {_ms(time.monotonic() - began)}"
    except Exception as exc:
        return f"{batch_id}: {type(exc).__name__}: {str(exc)[:200]}"


def _concurrent(config: LakeConfig, pairs: list[tuple[str, str]]) -> list[str]:
    start = time.time() + 3.0  # both attached before either begins
    with multiprocessing.get_context("spawn").Pool(len(pairs)) as pool:
        return pool.starmap(_append_worker, [(config, b, p, start) for b, p in pairs])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vannah-lake-bench-"))
    plan = plan_archive(args.instances)
    write_catalog(work / "data", plan, files=args.batches)
    files = sorted((work / "data" / "catalog" / "instances").glob("day=2*/*.parquet"))
    small = _rebatch(pq.read_table(files[0]).slice(0, 500), "small")
    with postgres_server(("lake",)) as pg, seaweedfs_server((BUCKET,)) as s3:
        config = LakeConfig(
            postgres=pg.libpq("lake"),
            data_path=f"s3://{BUCKET}/catalog/",
            s3_key_id=s3.access_key,
            s3_secret=s3.secret_key,
            s3_endpoint=s3.endpoint,
            s3_use_ssl=False,
        )
        began = time.monotonic()
        con = attach_lake(config)
        print(f"attach (creates the metadata tables): {_ms(time.monotonic() - began)}")
        ensure_tables(con, config)
        reader = open_reader(config)
        times = []
        for n, path in enumerate(files):
            rows = pq.read_table(path)
            began = time.monotonic()
            append_batch(con, config, f"big-{n}", {INSTANCE_VERSIONS: _rebatch(rows, f"big-{n}")})
            times.append(time.monotonic() - began)
            seen = reader.execute("SELECT count(*) FROM lake.instance_versions").fetchone()
            print(f"append {rows.num_rows:,} rows: {_ms(times[-1])}; reader sees {seen[0]:,}")
        began = time.monotonic()
        again = append_batch(con, config, "big-0", {INSTANCE_VERSIONS: _rebatch(
            pq.read_table(files[0]), "big-0")})  # fmt: skip
        print(f"retry of big-0: appended={again} in {_ms(time.monotonic() - began)}")
        small_times = []
        for n in range(5):
            began = time.monotonic()
            append_batch(
                con, config, f"small-{n}", {INSTANCE_VERSIONS: _rebatch(small, f"small-{n}")}
            )
            small_times.append(time.monotonic() - began)
        print(
            f"append 500 rows at {args.instances:,}: median {_ms(statistics.median(small_times))}"
        )

        studies = [s.study_uid for s in plan[:: max(1, len(plan) // args.queries)]]
        for label, sql in (
            ("lake.instance_versions", "SELECT * FROM lake.instance_versions WHERE "
             "study_instance_uid = ?"),
            ("instances view (current version), filter outside", "SELECT * FROM instances "
             "WHERE study_instance_uid = ?"),
            ("current versions, filter inside", current_select(
                "lake.instance_versions", "WHERE study_instance_uid = ?")),
            ("studies view, filter outside", "SELECT * FROM studies WHERE "
             "study_instance_uid = ?"),
            ("study row, filter inside", study_select("(" + current_select(
                "lake.instance_versions", "WHERE study_instance_uid = ?") + ")")),
        ):  # fmt: skip
            lat = []
            for uid in studies:
                began = time.monotonic()
                got = reader.execute(sql, [uid]).fetchall()
                lat.append(time.monotonic() - began)
                assert got, uid
            lat.sort()
            print(
                f"point query {label}: p50 {_ms(statistics.median(lat))}, "
                f"max {_ms(lat[-1])} ({len(got)} rows)"
            )
        services = CatalogReader(work / "service-host", lake=config)  # what a service holds
        for label, sql in (
            ("service reader: a study's instances", "SELECT sop_instance_uid FROM instances "
             "WHERE study_instance_uid = ?"),
            ("service reader: the study row", "SELECT * FROM studies "
             "WHERE study_instance_uid = ?"),
        ):  # fmt: skip
            lat = []
            for uid in studies:
                began = time.monotonic()
                got = services.query(sql, [uid])
                lat.append(time.monotonic() - began)
                assert got, uid
            lat.sort()
            print(
                f"point query {label}: p50 {_ms(statistics.median(lat))}, "
                f"max {_ms(lat[-1])} ({len(got)} rows)"
            )
        lat = []
        for uid in studies:
            began = time.monotonic()
            n_headers = sum(1 for _ in iter_headers(services, uid))
            lat.append(time.monotonic() - began)
        lat.sort()
        print(
            f"service reader: a study's headers (WADO-RS metadata): p50 "
            f"{_ms(statistics.median(lat))}, max {_ms(lat[-1])} ({n_headers} instances)"
        )
        services.close()
        began = time.monotonic()
        total = reader.execute("SELECT count(*) FROM instances").fetchone()
        print(f"count(*) of current instances: {total[0]:,} in {_ms(time.monotonic() - began)}")
        n_files = con.execute(
            "SELECT count(*) FROM ducklake_list_files('lake', 'instance_versions')"
        ).fetchone()
        print(f"instance_versions data files: {n_files[0]}")

        print("two processes appending different batches at the same moment:")
        for line in _concurrent(config, [("conc-a", str(files[1])), ("conc-b", str(files[2]))]):
            print("  " + line)
        print("two processes appending the same batch at the same moment:")
        for line in _concurrent(config, [("dup", str(files[3])), ("dup", str(files[3]))]):
            print("  " + line)
        dup = con.execute(
            "SELECT count(*), count(DISTINCT sop_instance_uid) FROM lake.instance_versions "
            "WHERE batch_id = 'dup'"
        ).fetchone()
        print(f"  rows of batch 'dup': {dup[0]:,} ({dup[1]:,} distinct SOP Instance UIDs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
