"""Receive-to-queryable latency with the platform running as `make up` runs it.

Starts the receiver and the Dagster daemon (sensor + in-process ingest runs, SQLite storage)
on one fresh data folder, then acts as a modality: one association, one CT instance every
`--interval` seconds. For each instance it records the C-STORE acknowledgement time and the
time its row first appears in the catalog (an in-memory ``CatalogReader`` refreshed every
0.1 s, as a reading service does). Prints p50/p95/min/max, and the receiver's peak memory.

Orthanc indexes inside the C-STORE (queryable on acknowledgement), so it has no figure to
compare here; the goal is p95 under 10 s.

    .venv/bin/python bench/latency.py [--instances N] [--interval S]
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    ReceiverServer,
    kill_group,
    markdown_table,
    run_dir,
)
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dagster_home import prepare_dagster_home
from vannah_pipelines.dicom.synthetic import MODALITIES, make_instance, to_part10
from vannah_pipelines.platform import dagster_daemon_argv, prepare_data_dir
from vannah_pipelines.settings import load_settings


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=60)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with run_dir("latency") as root:
        receiver = ReceiverServer(root)
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
        seen: dict[str, float] = {}
        stop = threading.Event()

        def poll() -> None:
            reader = CatalogReader(receiver.data_dir / "catalog")
            while not stop.is_set():
                if reader.refresh():
                    now = time.time()
                    for (uid,) in reader.query("SELECT sop_instance_uid FROM instances"):
                        seen.setdefault(uid, now)
                time.sleep(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        acked: dict[str, float] = {}
        try:
            ae = AE(ae_title="LATENCYSCU")
            ae.add_requested_context(MODALITIES["CT"].sop_class_uid, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", receiver.dicom_port, ae_title="VANNAHCLOUD")
            assert assoc.is_established
            study = make_instance("CT").StudyInstanceUID
            datasets = [
                pydicom.dcmread(
                    BytesIO(to_part10(make_instance("CT", study_uid=study, instance_number=i)))
                )
                for i in range(args.instances + 1)
            ]
            # Warm-up: the daemon's first sensor tick and code-server start are not latency.
            warm = datasets.pop(0)
            assoc.send_c_store(warm)
            poller.start()
            deadline = time.monotonic() + 120
            while str(warm.SOPInstanceUID) not in seen and time.monotonic() < deadline:
                time.sleep(0.2)
            print("warm-up instance indexed; sending", file=sys.stderr)
            for ds in datasets:
                status = assoc.send_c_store(ds)
                assert status.Status == 0, status
                acked[str(ds.SOPInstanceUID)] = time.time()
                time.sleep(args.interval)
            assoc.release()
            deadline = time.monotonic() + 120
            while not set(acked) <= set(seen) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            stop.set()
            kill_group(daemon)
            peak = receiver.memory.peak_bytes
            receiver.stop()
            log.close()
            if not set(acked) <= set(seen):
                shutil.copy(root / "daemon.log", REPO_ROOT / "bench" / "out" / "daemon.log")
        missing = set(acked) - set(seen)
        latencies = [seen[u] - t for u, t in acked.items() if u in seen]
        rows = [
            ["instances sent / queryable", f"{len(acked)} / {len(latencies)}"],
            ["p50", f"{quantile(latencies, 0.5):.1f} s"],
            ["p95", f"{quantile(latencies, 0.95):.1f} s"],
            ["min-max", f"{min(latencies):.1f}-{max(latencies):.1f} s"],
            ["mean", f"{statistics.mean(latencies):.1f} s"],
            ["receiver peak RSS (process tree)", f"{peak / 2**20:.0f} MiB"],
        ]
        print(
            f"Receive-to-queryable latency, one CT every {args.interval:g} s over one "
            f"association, daemon + sensor + in-process runs (SQLite)\n"
        )
        print(markdown_table(["figure", "value"], rows))
        if args.json:
            args.json.write_text(json.dumps({"latencies": latencies}, indent=2))
        return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
