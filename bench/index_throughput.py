"""Index throughput: instances/s from sealed landing batches into the catalog.

Measures ``ingest_batches`` (the body of the Dagster ``instance_index`` run: header parse,
validation, hot-tier placement, Parquet append, landing removal) on 20,000 small (~10 KB)
instances landed in batches of 500, as the receiver seals them. Orthanc has no separate
index step (it indexes inside C-STORE), so there is no side-by-side figure here; the goal
is 1,500 instances/s on this 2-core machine.

    .venv/bin/python bench/index_throughput.py [--instances N] [--repeats R] [--workers W ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pydicom
from common import Series, markdown_table, run_dir, synthetic_set

from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts


def land(files: tuple[Path, ...], landing: Path, per_batch: int) -> list[str]:
    """Land `files` in sealed batches the way the receiver does (fsynced, with receipts)."""
    zone = LandingZone(landing)
    ids: list[str] = []
    for start in range(0, len(files), per_batch):
        batch = zone.open_batch("dimse")
        for path in files[start : start + per_batch]:
            data = path.read_bytes()
            # The synthetic files are named by position; the SOP UID is in the header.
            uid = str(
                pydicom.dcmread(
                    path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
                ).SOPInstanceUID
            )
            batch.write_instance(
                data,
                ReceiveFacts(
                    uid,
                    "1.2.840.10008.5.1.4.1.1.2",
                    "1.2.840.10008.1.2.1",
                    "dimse",
                    calling_ae="BENCHSCU",
                ),
            )
        sealed = batch.seal()
        assert sealed is not None
        ids.append(sealed.batch_id)
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-batch", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = synthetic_set(args.instances, "tiny")
    results: dict[int, Series] = {w: Series() for w in args.workers}
    for repeat in range(args.repeats):
        for workers in args.workers:
            with run_dir("index") as root:
                paths = IngestPaths(
                    root / "landing", root / "hot", root / "catalog", root / "quarantine"
                )
                print(f"repeat {repeat + 1}: landing {len(data.files)} files", file=sys.stderr)
                ids = land(data.files, paths.landing_dir, args.per_batch)
                started = time.perf_counter()
                result = ingest_batches(paths, ids, workers=workers)
                seconds = time.perf_counter() - started
                count = CatalogReader(paths.catalog_dir).query("SELECT count(*) FROM instances")[0][
                    0
                ]
                assert count == result.instances == len(data.files), (count, result.instances)
                rate = result.instances / seconds
                results[workers].add(rate)
                print(f"  workers={workers}: {rate:.0f} inst/s ({seconds:.1f} s)", file=sys.stderr)
    rows = [
        [
            f"ingest_batches, {w} worker process{'es' if w > 1 else ''}",
            results[w].summary(suffix=" inst/s"),
        ]
        for w in args.workers
    ]
    print(
        f"Index throughput, {len(data.files)} instances of "
        f"{data.mean_bytes / 1e3:.1f} kB in batches of {args.per_batch}, "
        f"{args.repeats} repeats: median (min-max)\n"
    )
    print(markdown_table(["step", "instances/s"], rows))
    if args.json:
        args.json.write_text(
            json.dumps({str(w): s.as_dict() for w, s in results.items()}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
