"""The delivery log at scale: the routing queries on ``delivery_status`` with ~20M deliveries.

``build``: a catalog folder next to an existing synthetic 10M-instance archive (made by
bench/catalog_synth.py and compacted, e.g. ``/tmp/vhc-bench/c10m``), left untouched: its
serving database is copied, its compacted instance files are reached through a symlink.
Into the copy goes a synthetic delivery log of every instance but those of the newest day
(unrouted, "new"), to 2 destinations: ~99.9 % sent/committed, a few thousand
queued/waiting/failed/dead/cancelled, 2 % of the keys with an earlier ``queued`` row;
``compacted_deliveries`` is derived from it by compaction's own code
(:func:`create_compacted_changes`). Then a few pending (uncompacted) change files: outcomes
of open deliveries, terminal keys queued again, new deliveries of unrouted instances.

``run``: each query kind in a process of its own (peak RSS per kind), through
``CatalogReader`` with its default memory limit (``catalog_memory_limit_mb``):

* ``due``: ``due_deliveries`` for one destination (a routing run's), and ``due (all)``, for
  every destination (the routing sensor's, every 5 s);
* ``backlog``: ``backlog()`` (asset checks, metadata);
* ``queue check``: queue_deliveries' existence check for 500 new instances;
* ``route --status``: open the catalog, ``backlog()``, close (the CLI);
* ``unrouted``: dry_run's unrouted query (instances with no delivery) over the newest day.

    nice .venv/bin/python bench/delivery_scale.py build --archive /tmp/vhc-bench/c10m \
        --out /tmp/vhc-bench/dscale
    nice .venv/bin/python bench/delivery_scale.py run --out /tmp/vhc-bench/dscale --json x.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import markdown_table, quantile

KINDS = ("open", "due", "due (all)", "backlog", "queue check", "route --status", "unrouted")
DEST_A = "dicom AI_ENGINE@ai.internal:4243"
DEST_B = "s3://vhc-archive/ (af-south-1)"
RULES = [
    {
        "name": "CT to AI",
        "condition": {"modality": "CT"},
        "priority": "ROUTINE",
        "destination": {"aet": "AI_ENGINE", "host": "ai.internal", "port": 4243},
    },
    {
        "name": "Every study to the bucket",
        "condition": {"modality": ["CT", "MR"]},
        "mode": "study",
        "priority": "LOW",
        "destination": {"type": "s3", "bucket": "vhc-archive", "region": "af-south-1"},
    },
]
# "Now" for the queries: after every synthetic delivery (the archive's days end in 2026).
NOW = datetime(2027, 1, 1, tzinfo=UTC)
SERVING = "serving/g000001.duckdb"


def _synthetic_log(newest_day: str) -> str:
    """SELECT the synthetic delivery log (every row, history included) from the copy's
    ``compacted_instances``: two destinations per instance indexed before `newest_day`."""
    # h picks a key's state: 0 queued, 1 failed, 2 dead, 3 waiting (study rule) or queued,
    # 4 cancelled, else sent (even) or committed (odd); h < 200: an earlier queued row too.
    return f"""
WITH keys AS (
  SELECT i.sop_instance_uid, i.checksum, i.study_instance_uid, i.indexed_at,
         r.rule, r.destination, r.study_mode,
         hash(i.sop_instance_uid, r.destination) % 10000 AS h
  FROM compacted_instances i,
       (VALUES ('CT to AI', '{DEST_A}', false),
               ('Every study to the bucket', '{DEST_B}', true)) r(rule, destination, study_mode)
  WHERE i.indexed_at < TIMESTAMPTZ '{newest_day}'
), latest AS (
  SELECT *, CASE
      WHEN h = 0 THEN 'queued' WHEN h = 1 THEN 'failed' WHEN h = 2 THEN 'dead'
      WHEN h = 3 THEN CASE WHEN study_mode THEN 'waiting' ELSE 'queued' END
      WHEN h = 4 THEN 'cancelled'
      WHEN h % 2 = 0 THEN 'sent' ELSE 'committed' END AS status,
    indexed_at + INTERVAL 5 SECOND AS changed_at
  FROM keys
), rows AS (
  SELECT *, 0 AS n FROM latest
  UNION ALL
  SELECT * REPLACE ('queued' AS status, indexed_at + INTERVAL 1 SECOND AS changed_at), 1 AS n
  FROM latest WHERE h < 200
)
SELECT sop_instance_uid, checksum, rule, destination, study_instance_uid, status,
  CAST(CASE WHEN status IN ('queued', 'waiting') AND n = 0 THEN h % 3
            WHEN status = 'dead' THEN 8 ELSE 1 END AS INTEGER) AS attempts,
  CASE WHEN study_mode THEN 'LOW' ELSE 'ROUTINE' END AS priority,
  indexed_at + INTERVAL 1 SECOND AS queued_at,
  CASE WHEN status IN ('queued', 'failed')
       THEN changed_at + to_seconds(CAST((hash(sop_instance_uid) % 3) * 30 AS DOUBLE)) END
    AS next_attempt_at,
  CASE WHEN status IN ('sent', 'committed') THEN CAST(9144 AS BIGINT) END AS bytes_sent,
  CASE WHEN status IN ('failed', 'dead') THEN 'association rejected' END AS last_error,
  CAST(NULL AS VARCHAR) AS detail,
  changed_at,
  strftime(changed_at, '%Y%m%dT%H%M%S%f') || '-1-' || lpad(CAST(n AS VARCHAR), 6, '0')
    || '-' || substr(checksum, 1, 8) AS change_id,
  'bench' AS changed_by
FROM rows"""


def build(archive: Path, out: Path, memory_limit_mb: int) -> None:
    import duckdb

    from vannah_pipelines.catalog.changes import DELIVERIES, append_change
    from vannah_pipelines.catalog.compaction import Manifest, create_compacted_changes
    from vannah_pipelines.catalog.writer import CatalogWriter

    source = archive / "catalog"
    root = out / "catalog"
    if root.exists():
        raise SystemExit(f"{root} exists: remove it first (it holds only this bench's data)")
    started = time.monotonic()
    (root / "serving").mkdir(parents=True)
    given = Manifest.load(source)
    assert given.serving is not None, f"{source} was never compacted"
    shutil.copyfile(source / given.serving, root / SERVING)
    (root / "compacted").symlink_to(source / "compacted")  # read, never written
    CatalogWriter(root).ensure()
    Manifest(
        generation=1,
        serving=SERVING,
        files={"instances": given.files.get("instances", [])},
        created_at=datetime.now(UTC).isoformat(),
    ).save(root)
    print(f"copied the serving database in {time.monotonic() - started:.0f} s", file=sys.stderr)

    con = duckdb.connect(str(root / SERVING))
    con.execute(f"SET memory_limit = '{memory_limit_mb}MB'")
    con.execute(f"SET temp_directory = '{out / 'tmp'}'")
    row = con.execute("SELECT max(indexed_at)::DATE FROM compacted_instances").fetchone()
    assert row is not None
    newest_day = str(row[0])
    con.execute(f"DROP TABLE IF EXISTS compacted_{DELIVERIES.name}")
    con.execute(f"CREATE TEMP VIEW _log AS {_synthetic_log(newest_day)}")
    t = time.monotonic()
    create_compacted_changes(con, DELIVERIES, "_log")
    counts = con.execute(
        f"SELECT status, count(*) FROM compacted_{DELIVERIES.name} GROUP BY 1 ORDER BY 1"
    ).fetchall()
    print(f"compacted_deliveries in {time.monotonic() - t:.0f} s: {dict(counts)}", file=sys.stderr)
    # Pending appends: outcomes of open deliveries, terminal ones queued again, new ones.
    columns = [*DELIVERIES.key_columns, *DELIVERIES.value_columns]
    picks = {
        "sent": "status = 'queued' AND destination = ? LIMIT 1000",
        "dead": "status = 'failed' LIMIT 300",
        "requeued": "status IN ('sent', 'dead') AND hash(sop_instance_uid) % 5000 = 7 LIMIT 500",
        "committed": "status = 'waiting' LIMIT 200",
    }
    now = datetime.now(UTC)
    writer = CatalogWriter(root)
    for what, where in picks.items():
        result = con.execute(
            f"SELECT {', '.join(columns)} FROM compacted_{DELIVERIES.name} WHERE {where}",
            [DEST_A] if "?" in where else [],
        )
        names = [d[0] for d in result.description or []]
        rows = [dict(zip(names, r, strict=True)) for r in result.fetchall()]
        for r in rows:
            r["status"] = "queued" if what == "requeued" else what
            r["next_attempt_at"] = now if what == "requeued" else None
        append_change(writer, DELIVERIES, rows, changed_by="bench", changed_at=now)
    fresh = con.execute(
        "SELECT sop_instance_uid, checksum, study_instance_uid FROM compacted_instances "
        "WHERE indexed_at >= ? ORDER BY sop_instance_uid LIMIT 500",
        [newest_day],
    ).fetchall()
    append_change(
        writer,
        DELIVERIES,
        [
            {
                "sop_instance_uid": s, "checksum": c, "rule": "CT to AI",
                "destination": DEST_A, "study_instance_uid": st, "status": "queued",
                "attempts": 0, "priority": "ROUTINE", "queued_at": now, "next_attempt_at": now,
            }
            for s, c, st in fresh
        ],
        changed_by="bench",
        changed_at=now,
    )  # fmt: skip
    con.execute("CHECKPOINT")
    con.close()
    (out / "newest_day").write_text(newest_day)
    print(f"built {root} in {time.monotonic() - started:.0f} s", file=sys.stderr)


def add_open_table(out: Path) -> None:
    """Add ``compacted_open_deliveries`` to a copy built before compaction wrote it (as the
    next compaction would), so the same log is measured before and after."""
    import duckdb

    from vannah_pipelines.catalog.compaction import create_open_deliveries

    con = duckdb.connect(str(out / "catalog" / SERVING))
    try:
        con.execute("DROP TABLE IF EXISTS compacted_open_deliveries")
        create_open_deliveries(con)
        con.execute("CHECKPOINT")
    finally:
        con.close()


def _one(
    out: Path, kind: str, repeats: int, budget_s: float, min_runs: int, warm_up: bool
) -> dict[str, Any]:
    """Time `kind` in this process: a warm-up (unless not `warm_up`), then up to `repeats`
    runs (at least `min_runs`, and no more once `budget_s` is spent)."""
    from vannah_pipelines.catalog.reader import CatalogReader
    from vannah_pipelines.routing.deliveries import backlog, due_deliveries
    from vannah_pipelines.routing.dry_run import _rows
    from vannah_pipelines.routing.rules import parse_rules
    from vannah_pipelines.settings import Settings

    root = out / "catalog"
    limit = Settings(data_dir=out).catalog_memory_limit_mb
    rules = parse_rules(RULES)
    newest = datetime.fromisoformat((out / "newest_day").read_text()).replace(tzinfo=UTC)
    t = time.perf_counter()
    catalog = CatalogReader(root, memory_limit_mb=limit)
    open_ms = (time.perf_counter() - t) * 1000
    [(pending,)] = catalog.query("SELECT count(*) FROM o_deliveries")
    fresh = [
        r[0]
        for r in catalog.query(
            "SELECT sop_instance_uid FROM instances WHERE indexed_at >= ? "
            "ORDER BY sop_instance_uid DESC LIMIT 500",
            [newest],
        )
    ]

    def run() -> int:
        if kind == "open":
            CatalogReader(root, memory_limit_mb=limit).close()
            return 0
        if kind == "due":
            return len(due_deliveries(catalog, rules, now=NOW, destination=DEST_A))
        if kind == "due (all)":  # the routing sensor's call
            return len(due_deliveries(catalog, rules, now=NOW))
        if kind == "backlog":
            return sum(b.queued + b.failed for b in backlog(catalog))
        if kind == "queue check":
            return len(
                catalog.query(
                    "SELECT sop_instance_uid, checksum, rule, destination FROM delivery_status "
                    "WHERE sop_instance_uid IN (SELECT unnest(?))",
                    [fresh],
                )
            )
        if kind == "route --status":
            reader = CatalogReader(root, memory_limit_mb=limit)
            try:
                return len(backlog(reader))
            finally:
                reader.close()
        if kind == "unrouted":
            pages = _rows(catalog, ["sop_instance_uid"], newest, None, 5000, "indexed_at", True)
            return sum(len(p) for p in pages)
        raise ValueError(kind)

    answers = run() if warm_up else None
    times: list[float] = []
    spent = time.monotonic()
    while len(times) < repeats and (len(times) < min_runs or time.monotonic() - spent < budget_s):
        t = time.perf_counter()
        got = run()
        times.append((time.perf_counter() - t) * 1000)
        answers = got if answers is None else answers
        assert got == answers, (kind, got, answers)
    catalog.close()
    return {
        "kind": kind,
        "times_ms": times,
        "answers": answers,
        "open_ms": open_ms,
        "pending_rows": pending,
        "memory_limit_mb": limit,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _fmt(times: list[float]) -> tuple[str, str]:
    p50, p95 = statistics.median(times), quantile(times, 0.95)
    return f"{p50:.1f} / {p95:.1f}", f"{min(times):.1f}-{max(times):.1f}"


def run(
    out: Path, kinds: list[str], repeats: int, budget_s: float, min_runs: int, warm_up: bool
) -> list[dict[str, Any]]:
    results = []
    for kind in kinds:
        proc = subprocess.run(
            [sys.executable, __file__, "one", "--out", str(out), "--kind", kind,
             "--repeats", str(repeats), "--budget", str(budget_s), "--min-runs",
             str(min_runs), *([] if warm_up else ["--no-warm-up"])],
            check=False, capture_output=True, text=True, env={**os.environ},
        )  # fmt: skip
        if proc.returncode != 0:
            print(f"{kind}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{kind}: {_fmt(r['times_ms'])} ms, {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--archive", type=Path, required=True, help="data folder with catalog/")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--memory-limit-mb", type=int, default=2048)
    sub.add_parser("open-table").add_argument("--out", type=Path, required=True)
    for name in ("run", "one"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--repeats", type=int, default=20)
        p.add_argument("--budget", type=float, default=60.0, help="seconds per kind, after 3")
        p.add_argument("--json", type=Path)
        p.add_argument("--min-runs", type=int, default=3)
        p.add_argument("--no-warm-up", action="store_true", help="(slow queries: the 'before')")
    sub.choices["run"].add_argument("--kinds", default=",".join(KINDS))
    sub.choices["one"].add_argument("--kind", choices=KINDS, required=True)
    args = parser.parse_args()
    if args.command == "build":
        build(args.archive.resolve(), args.out.resolve(), args.memory_limit_mb)
        return 0
    if args.command == "open-table":
        add_open_table(args.out.resolve())
        return 0
    if args.command == "one":
        figures = _one(
            args.out.resolve(),
            args.kind,
            args.repeats,
            args.budget,
            args.min_runs,
            not args.no_warm_up,
        )
        print(json.dumps(figures))
        return 0
    started = datetime.now(UTC) - timedelta(seconds=0)
    load = os.getloadavg()
    results = run(
        args.out.resolve(),
        args.kinds.split(","),
        args.repeats,
        args.budget,
        args.min_runs,
        not args.no_warm_up,
    )
    rows = [
        [r["kind"], *_fmt(r["times_ms"]), str(len(r["times_ms"])), str(r["answers"]),
         f"{r['peak_rss_mib']:.0f} MiB"]
        for r in results
    ]  # fmt: skip
    first = results[0]
    print(
        f"\n{started:%Y-%m-%d %H:%M} UTC, load average {load[0]:.1f} at start; "
        f"CatalogReader memory limit {first['memory_limit_mb']} MB, "
        f"{first['pending_rows']} pending delivery rows\n"
    )
    print(
        markdown_table(["query", "p50 / p95 ms", "min-max ms", "runs", "answers", "peak RSS"], rows)
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
