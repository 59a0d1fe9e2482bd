"""The catalog at scale, measured on the real services: start-up, memory, QIDO-RS, WADO-RS
metadata and C-FIND latency, and the cost of ingesting a batch, on a synthetic archive.

``services``: starts ``python -m dicomweb`` and ``python -m receiver`` on the archive's data
folder (catalog only: no instance files, so no retrieval), and measures

* start-up: process spawn to port open (the DICOMweb service opens its catalog first);
* memory: VmRSS of the DICOMweb process, and of the receiver's process tree, after start and
  after the queries (peak sampled every 50 ms);
* the query kinds of bench/catalog_design.py over HTTP (one keep-alive connection) and the
  study searches as C-FIND (DCMTK findscu, a process per query), 30
  varied values each after a warm-up: p50 / p95 / min-max.

``ingest``: the cost of adding a batch to the archive (real DICOM files landed, then what
the Dagster ingest run does: ``ingest_batches`` and the run's asset checks), `--repeats`
times, on the archive and on an empty catalog, interleaved.

    nice .venv/bin/python bench/catalog_scale.py services --archive /tmp/vhc-bench/c10m \
        --instances 10000000
    nice .venv/bin/python bench/catalog_scale.py ingest --archive /tmp/vhc-bench/c10m --repeats 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from catalog_design import KINDS, query_set
from cfind_latency import findscu
from common import DicomWebServer, HttpClient, ReceiverServer, markdown_table, quantile

QIDO = KINDS[:5]  # the study searches
CFIND_KINDS = KINDS[:4]  # PatientID, PatientName=X*, StudyDate, AccessionNumber


def _stats(times: list[float]) -> str:
    return (
        f"{statistics.median(times):.1f} / {quantile(times, 0.95):.1f} "
        f"({min(times):.1f}-{max(times):.1f})"
    )


def services(archive: Path, instances: int) -> dict[str, Any]:
    queries = query_set(instances)
    work = Path(tempfile.mkdtemp(prefix="vhc-scale-"))
    web = DicomWebServer(work / "web", archive, extra_env={"VANNAH_DICOMWEB_MAX_LIMIT": "100000"})
    receiver = ReceiverServer(work / "rx", extra_env={})
    receiver.workdir.mkdir(parents=True, exist_ok=True)
    (receiver.workdir / "data").symlink_to(archive)
    figures: dict[str, Any] = {}
    try:
        web.start()
        figures["dicomweb_start_s"] = web.ready_seconds
        time.sleep(1)
        assert web.memory is not None
        figures["dicomweb_rss_start_mib"] = web.memory.sample() / 2**20
        started = time.monotonic()
        receiver.start()
        figures["receiver_start_s"] = time.monotonic() - started
        http = HttpClient(web.http_port)
        rows = []
        for kind, values in queries.items():
            if kind in QIDO:

                def qido(value: dict[str, str]) -> int:
                    query = urllib.parse.urlencode(value)
                    result = http.get(f"/dicom-web/studies?{query}")
                    assert result.status in (200, 204), result.status
                    return (result.body or b"").count(b'"0020000D"')

                get = qido
            elif kind == KINDS[5]:

                def get(uid: str) -> int:
                    result = http.get(f"/dicom-web/studies/{uid}/series")
                    return (result.body or b"").count(b'"0020000E"')
            elif kind == KINDS[6]:

                def get(uid: str) -> int:
                    result = http.get(f"/dicom-web/studies/{uid}/instances")
                    return (result.body or b"").count(b'"00080018"')
            else:

                def get(uid: str) -> int:
                    result = http.get(f"/dicom-web/studies/{uid}/metadata")
                    return (result.body or b"").count(b'"00080018"')

            get(values[-1])  # warm-up
            times, counts = [], []
            for value in values:
                t = time.perf_counter()
                counts.append(get(value))
                times.append((time.perf_counter() - t) * 1000)
            rows.append([f"QIDO/WADO {kind}", _stats(times), str(statistics.median(counts))])
            figures[f"http {kind}"] = times

        keyword = {
            KINDS[0]: "PatientID",
            KINDS[1]: "PatientName",
            KINDS[2]: "StudyDate",
            KINDS[3]: "AccessionNumber",
        }
        for kind in CFIND_KINDS:
            values = queries[kind]

            def find(value: dict[str, str], _kind: str = kind) -> int:
                # DCMTK's findscu, a whole process per query (association, C-FIND, release)
                params = {keyword[_kind]: value[keyword[_kind]]}
                _, answers, _, error = findscu(receiver, params)
                assert not error, error
                return answers

            find(values[-1])
            times, counts = [], []
            for value in values:
                t = time.perf_counter()
                counts.append(find(value))
                times.append((time.perf_counter() - t) * 1000)
            rows.append([f"C-FIND (findscu) {kind}", _stats(times), str(statistics.median(counts))])
            figures[f"cfind {kind}"] = times
        http.close()
        figures["dicomweb_rss_end_mib"] = web.memory.sample() / 2**20
        figures["dicomweb_rss_peak_mib"] = web.memory.peak_bytes / 2**20
        assert receiver.memory is not None
        figures["receiver_tree_rss_end_mib"] = receiver.memory.sample() / 2**20
        figures["receiver_tree_rss_peak_mib"] = receiver.memory.peak_bytes / 2**20
        figures["rows"] = rows
    finally:
        web.stop()
        receiver.stop()
        shutil.rmtree(work, ignore_errors=True)
    return figures


def _land_batch(data_dir: Path, count: int, seed: int) -> str:
    from vannah_pipelines.dicom.synthetic import make_instance, to_part10
    from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts

    batch = LandingZone(data_dir / "landing").open_batch("dimse")
    study = make_instance("CT", seed=seed).StudyInstanceUID
    for i in range(count):
        ds = make_instance("CT", rows=64, columns=64, study_uid=study, instance_number=i, seed=i)
        batch.write_instance(
            to_part10(ds),
            ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "dimse"),
        )
    sealed = batch.seal()
    assert sealed is not None
    return sealed.batch_id


def ingest(archive: Path, repeats: int, per_batch: int) -> dict[str, Any]:
    """Seconds per batch, on the archive and on an empty catalog (interleaved)."""
    from vannah_pipelines.catalog.checks import duplicate_sop_instance_uids, missing_files
    from vannah_pipelines.catalog.compaction import ensure_catalog
    from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches

    work = Path(tempfile.mkdtemp(prefix="vhc-ingest-"))
    empty = work / "empty"
    ensure_catalog(empty / "catalog")
    results: dict[str, list[float]] = {"empty": [], "archive": []}
    added: list[Path] = []
    try:
        for n in range(repeats):
            for label, data in (("empty", empty), ("archive", archive)):
                paths = IngestPaths(
                    data / "landing", work / f"hot-{label}", data / "catalog", data / "quarantine"
                )
                batch_id = _land_batch(data, per_batch, seed=1000 + n)
                started = time.perf_counter()
                result = ingest_batches(paths, [batch_id], workers=2)
                assert not duplicate_sop_instance_uids(paths.catalog_dir, result.batches)
                assert not missing_files(paths.catalog_dir, paths.hot_dir, result.catalog_files)
                results[label].append(time.perf_counter() - started)
                if label == "archive":
                    added += [Path(f) for f in result.catalog_files]
    finally:
        for path in added:  # leave the archive as it was
            path.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("services")
    s.add_argument("--archive", type=Path, required=True, help="data folder with catalog/")
    s.add_argument("--instances", type=int, required=True)
    i = sub.add_parser("ingest")
    i.add_argument("--archive", type=Path, required=True)
    i.add_argument("--repeats", type=int, default=5)
    i.add_argument("--per-batch", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "services":
        figures = services(args.archive.resolve(), args.instances)
        print(f"\n{args.instances:,} instances ({args.archive})\n")
        print(markdown_table(["query", "p50 / p95 ms (min-max)", "answers"], figures["rows"]))
        print()
        print(
            markdown_table(
                ["figure", "value"],
                [
                    [
                        "DICOMweb start-up (spawn to port open)",
                        f"{figures['dicomweb_start_s']:.2f} s",
                    ],
                    ["receiver start-up", f"{figures['receiver_start_s']:.2f} s"],
                    [
                        "DICOMweb RSS after start / after queries / peak",
                        f"{figures['dicomweb_rss_start_mib']:.0f} / "
                        f"{figures['dicomweb_rss_end_mib']:.0f} / "
                        f"{figures['dicomweb_rss_peak_mib']:.0f} MiB",
                    ],
                    [
                        "receiver process tree RSS after queries / peak",
                        f"{figures['receiver_tree_rss_end_mib']:.0f} / "
                        f"{figures['receiver_tree_rss_peak_mib']:.0f} MiB",
                    ],
                ],
            )
        )
    else:
        figures = ingest(args.archive.resolve(), args.repeats, args.per_batch)
        rows = [
            [
                label,
                f"{statistics.median(v):.2f} s",
                f"{min(v):.2f}-{max(v):.2f} s",
                f"{args.per_batch / statistics.median(v):.0f} inst/s",
            ]
            for label, v in figures.items()
        ]
        ratio = statistics.median(figures["archive"]) / statistics.median(figures["empty"])
        print(f"\nIngest of one {args.per_batch}-instance batch, {args.repeats} repeats\n")
        print(markdown_table(["catalog", "median", "min-max", "throughput"], rows))
        print(f"\narchive / empty: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
