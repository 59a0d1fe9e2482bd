"""Receive-to-queryable latency, ours (as `make up` runs it) and Orthanc's, side by side.

Ours: the receiver, the Dagster daemon (sensor + in-process ingest runs, SQLite storage)
and the DICOMweb service on one fresh data folder. Orthanc: Debian's, with its DICOMweb
plugin. Each is sent one CT instance every `--interval` seconds over one association, as a
modality sends; after each C-STORE acknowledgement the benchmark asks QIDO-RS for that
instance every 10 ms until it answers. For ours it also records when Dagster's ingest run
has indexed it (its row in the catalog's batch files, with a reader that does not look at
the landing zone), which is when the catalog's record is written.

    .venv/bin/python bench/latency.py [--instances N] [--interval S] [--targets vannah orthanc]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
from common import (
    REPO_ROOT,
    DicomWebServer,
    HttpClient,
    OrthancServer,
    ReceiverServer,
    Server,
    kill_group,
    markdown_table,
    quantile,
    run_dir,
)
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dagster_home import prepare_dagster_home
from vannah_pipelines.dicom.synthetic import MODALITIES, make_instance, to_part10
from vannah_pipelines.platform import dagster_daemon_argv, prepare_data_dir
from vannah_pipelines.settings import load_settings

POLL_SECONDS = 0.01


def _datasets(count: int) -> list[pydicom.Dataset]:
    study = make_instance("CT").StudyInstanceUID
    return [
        pydicom.dcmread(BytesIO(to_part10(make_instance("CT", study_uid=study, instance_number=i))))
        for i in range(count)
    ]


def _until_found(http: HttpClient, path: str, deadline: float) -> float | None:
    """Time (epoch) at which QIDO-RS `path` first answered a non-empty array."""
    while time.monotonic() < deadline:
        result = http.get(path, headers={"Accept": "application/dicom+json"})
        if result.status == 200 and result.body and result.body.strip() not in (b"", b"[]"):
            return time.time()
        time.sleep(POLL_SECONDS)
    return None


def measure(
    target: str,
    server: Server,
    http_port: int,
    count: int,
    interval: float,
    on_ack: object = None,
) -> dict[str, float]:
    """Send `count` instances (after one warm-up); per SOP UID, seconds from the
    acknowledgement to the first QIDO-RS answer naming it."""
    http = HttpClient(http_port, timeout=30)
    ae = AE(ae_title="LATENCYSCU")
    ae.add_requested_context(MODALITIES["CT"].sop_class_uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
    assert assoc.is_established, f"{target}: association refused"
    latencies: dict[str, float] = {}
    try:
        datasets = _datasets(count + 1)
        for n, ds in enumerate(datasets):
            status = assoc.send_c_store(ds)
            assert status.Status == 0, status
            acked = time.time()
            if callable(on_ack):
                on_ack(str(ds.SOPInstanceUID), acked)
            path = (
                f"/dicom-web/studies/{ds.StudyInstanceUID}/instances"
                f"?SOPInstanceUID={ds.SOPInstanceUID}"
            )
            found = _until_found(http, path, time.monotonic() + 60)
            if n and found is not None:  # the first one is the warm-up
                latencies[str(ds.SOPInstanceUID)] = found - acked
            time.sleep(interval)
    finally:
        assoc.release()
        http.close()
    return latencies


def run_vannah(
    root: Path, count: int, interval: float
) -> tuple[dict[str, float], dict[str, float]]:
    receiver = ReceiverServer(root / "vannah")
    receiver.start()
    env = prepare_data_dir(load_settings(data_dir=receiver.data_dir))
    prepare_dagster_home(Path(env["DAGSTER_HOME"]), env)
    log = (root / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        dagster_daemon_argv(),
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    web = DicomWebServer(root / "web", receiver.data_dir)
    web.start()
    acked: dict[str, float] = {}
    indexed: dict[str, float] = {}
    stop = threading.Event()

    def poll_index() -> None:  # the catalog's record: batch files only, no landing overlay
        reader = CatalogReader(receiver.data_dir / "catalog")
        while not stop.is_set():
            if reader.refresh():
                now = time.time()
                for (uid,) in reader.query("SELECT sop_instance_uid FROM instances"):
                    indexed.setdefault(uid, now)
            time.sleep(0.1)

    poller = threading.Thread(target=poll_index, daemon=True)
    poller.start()
    try:
        queryable = measure(
            "vannah",
            receiver,
            web.http_port,
            count,
            interval,
            on_ack=lambda uid, t: acked.__setitem__(uid, t),
        )
        deadline = time.monotonic() + 120
        while not set(acked) <= set(indexed) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        kill_group(daemon)
        web.stop()
        receiver.stop()
        log.close()
    index_latency = {u: indexed[u] - t for u, t in acked.items() if u in indexed and u in queryable}
    return queryable, index_latency


def run_orthanc(root: Path, count: int, interval: float) -> dict[str, float]:
    orthanc = OrthancServer(root / "orthanc", dicomweb=True)
    orthanc.start()
    try:
        return measure("orthanc", orthanc, orthanc.http_port, count, interval)
    finally:
        orthanc.stop()


def _row(label: str, values: list[float], sent: int) -> list[str]:
    if not values:
        return [label, f"0 / {sent}", "-", "-", "-"]
    ms = [v * 1000 for v in values]
    return [
        label,
        f"{len(values)} / {sent}",
        f"{statistics.median(ms):.0f} ms",
        f"{quantile(ms, 0.95):.0f} ms",
        f"{min(ms):.0f}-{max(ms):.0f} ms",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=60)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--targets", nargs="+", default=["vannah", "orthanc"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows, figures = [], {}
    with run_dir("latency") as root:
        for target in args.targets:
            if target == "vannah":
                queryable, index = run_vannah(root, args.instances, args.interval)
                rows.append(
                    _row(
                        "vannah: acknowledgement -> QIDO-RS answers",
                        list(queryable.values()),
                        args.instances,
                    )
                )
                rows.append(
                    _row(
                        "vannah: acknowledgement -> indexed by the Dagster run",
                        list(index.values()),
                        args.instances,
                    )
                )
                figures["vannah"] = {"queryable": queryable, "indexed": index}
            elif target == "orthanc":
                queryable = run_orthanc(root, args.instances, args.interval)
                rows.append(
                    _row(
                        "orthanc: acknowledgement -> QIDO-RS answers",
                        list(queryable.values()),
                        args.instances,
                    )
                )
                figures["orthanc"] = {"queryable": queryable}
    print(
        f"Receive-to-queryable, one CT every {args.interval:g} s over one association, "
        f"QIDO-RS polled every {POLL_SECONDS * 1000:.0f} ms after each acknowledgement\n"
    )
    print(markdown_table(["measure", "answered", "p50", "p95", "min-max"], rows))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    missing = any(len(f["queryable"]) < args.instances for f in figures.values())
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
