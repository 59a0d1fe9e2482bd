"""QIDO-RS study search latency, our DICOMweb service and Orthanc + DICOMweb plugin side by side.

Three queries on an archive shaped like a real one (bench/catalog_synth.py: 100 instances per
study over 2-5 series, patients with 1-5 studies, varied name initials, dates over 2019-2023):
a PatientID match (a patient with one study), a StudyDate range of one month, and a
PatientName prefix wildcard ``A*``.

* Up to ``--orthanc-max`` instances (default 100,000) both sides serve the same real tiny
  DICOM files: Orthanc (BASELINES.md configuration) loaded by storescu over 4 associations,
  ours through ``vannah import --ingest`` (landing zone + ingest_batches). Both are cached
  under bench/out/cache/ keyed by the parameters, so a rerun does not reload.
* Above it (default 1,000,000) ours only, from catalog batch files written directly by
  catalog_synth.py: loading Orthanc by C-STORE at ~540 inst/s would take 30+ minutes and
  slows as its index grows, so Orthanc is measured at the smaller size only.

The client (this process, one keep-alive connection per server) sends `--warmup` then
`--requests` requests per query and server, interleaved ours/Orthanc, and times each request
to the last byte. Prints p50/p95/min-max per query, the p50/p95 ratios ours/Orthanc, the study
counts each side answered (they must agree), and our service's startup (catalog load) time
and memory. Our QIDO-RS ceiling is raised (VANNAH_DICOMWEB_MAX_LIMIT) so ``A*`` answers every
matching study at 1M too; Orthanc has no limit by default.

    .venv/bin/python bench/qido_latency.py                      # 100k (both) + 1M (ours)
    .venv/bin/python bench/qido_latency.py --quick              # 2k (both) + 20k, smoke
    .venv/bin/python bench/qido_latency.py --sizes 100000 --requests 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from catalog_synth import PLAN_VERSION, QueryKind, plan_archive, query_kinds
from common import (
    BENCH_DIR,
    LATENCY_HEADER,
    OUT_DIR,
    DataSet,
    DicomWebServer,
    HttpClient,
    OrthancServer,
    Side,
    install_signal_handlers,
    latency_cells,
    log,
    mib,
    niced,
    print_table,
    run_dir,
    run_storescu,
    signals_deferred,
    vannah_import,
)

CACHE_DIR = OUT_DIR / "cache"
ACCEPT = {"Accept": "application/dicom+json"}
OURS_ENV = {"VANNAH_DICOMWEB_MAX_LIMIT": "1000000"}


@dataclass
class SizeResult:
    instances: int
    with_orthanc: bool
    studies: int
    kinds: list[QueryKind]
    results: dict[tuple[str, str], Side] = field(default_factory=dict)  # (target, label)
    facts: dict[str, float | str] = field(default_factory=dict)


# --------------------------------------------------------------------------- data


def cache_root(instances: int, per_study: int, seed: int) -> Path:
    return CACHE_DIR / f"qido-v{PLAN_VERSION}-{instances}-p{per_study}-seed{seed}"


def ensure_files(root: Path, args: argparse.Namespace, instances: int) -> DataSet:
    folder = root / "files"
    marker = root / ".files-complete"
    if not marker.exists():
        log(f"generating {instances:,} tiny DICOM files (resumable) -> {folder}")
        started = time.monotonic()
        niced(
            [
                sys.executable,
                str(BENCH_DIR / "catalog_synth.py"),
                "dicom",
                "--instances",
                str(instances),
                "--per-study",
                str(args.per_study),
                "--seed",
                str(args.seed),
                "--out",
                str(folder),
            ]
        )
        log(f"  files generated in {time.monotonic() - started:.0f} s")
        marker.touch()
    files = tuple(sorted(p for p in folder.iterdir() if p.suffix == ".dcm"))
    return DataSet(root.name, root, files)


def ensure_orthanc(root: Path, data: DataSet, facts: dict[str, float | str]) -> Path:
    """Orthanc's working folder (storage + SQLite index) with `data` loaded, cached."""
    workdir = root / "orthanc"
    marker = root / ".orthanc-complete"
    if marker.exists():
        return workdir
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"loading {len(data.files):,} instances into Orthanc (storescu, 4 associations)")
    with OrthancServer(workdir) as orthanc:
        result = run_storescu(
            data, port=orthanc.dicom_port, called_aet=orthanc.aet, associations=4, logdir=root
        )
        stored = orthanc.stored_instances()
    if stored != len(data.files):
        raise RuntimeError(f"Orthanc stored {stored} of {len(data.files)} instances")
    facts["orthanc_load_inst_per_s"] = result.instances_per_s
    log(f"  Orthanc loaded in {result.seconds:.0f} s ({result.instances_per_s:.0f} inst/s)")
    marker.touch()
    return workdir


def ensure_vannah_ingested(root: Path, data: DataSet, facts: dict[str, float | str]) -> Path:
    """Our data folder with the same files imported and ingested (the real path), cached."""
    data_dir = root / "vannah"
    marker = root / ".vannah-complete"
    if marker.exists():
        return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    log(f"importing + ingesting {len(data.files):,} files into our data folder")
    started = time.monotonic()
    vannah_import(data_dir, data.folder / "files")
    facts["vannah_import_ingest_s"] = time.monotonic() - started
    log(f"  imported + ingested in {facts['vannah_import_ingest_s']:.0f} s")
    marker.touch()
    return data_dir


def ensure_vannah_synth(
    root: Path, instances: int, args: argparse.Namespace, facts: dict[str, float | str]
) -> Path:
    """Our data folder with a catalog written directly (no stored files), cached."""
    data_dir = root / "vannah-synth"
    marker = root / ".vannah-synth-complete"
    if marker.exists():
        return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    log(f"writing a {instances:,}-row catalog directly (catalog_synth.py)")
    started = time.monotonic()
    niced(
        [
            sys.executable,
            str(BENCH_DIR / "catalog_synth.py"),
            "catalog",
            "--instances",
            str(instances),
            "--per-study",
            str(args.per_study),
            "--seed",
            str(args.seed),
            "--files",
            str(args.files),
            "--data-dir",
            str(data_dir),
        ]
    )
    facts["catalog_synth_s"] = time.monotonic() - started
    log(f"  catalog written in {facts['catalog_synth_s']:.0f} s")
    marker.touch()
    return data_dir


# --------------------------------------------------------------------------- measuring


def study_query(kind: QueryKind) -> str:
    # "*" and "^" literal, as viewers send them (Orthanc does not match "A%2A" as "A*").
    return "/dicom-web/studies?" + urllib.parse.urlencode(kind.params, safe="*^")


def timed(client: HttpClient, kind: QueryKind, side: Side, record: bool) -> None:
    try:
        result = client.get(study_query(kind), ACCEPT)
    except OSError as exc:
        side.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if result.status not in (200, 204):
        side.errors.append(f"HTTP {result.status}: {(result.body or b'')[:200]!r}")
        return
    count = len(json.loads(result.body)) if result.status == 200 and result.body else 0
    if side.count is not None and side.count != count:
        side.errors.append(f"answer changed: {side.count} then {count} studies")
    side.count = count
    if record:
        side.times_ms.append(result.seconds * 1e3)


def measure(size: SizeResult, clients: dict[str, HttpClient], args: argparse.Namespace) -> None:
    targets = list(clients)
    for kind in size.kinds:
        sides = {t: size.results.setdefault((t, kind.label), Side()) for t in targets}
        for i in range(args.warmup + args.requests):
            order = targets if i % 2 == 0 else targets[::-1]
            for target in order:
                timed(clients[target], kind, sides[target], record=i >= args.warmup)
        summary = ", ".join(
            f"{t} p50 {sides[t].p(0.5):.1f} ms ({sides[t].count} studies)" for t in targets
        )
        log(f"  {kind.label}: {summary}; plan says {kind.expected}")


def prepare_archive(
    instances: int,
    studies: int,
    with_orthanc: bool,
    args: argparse.Namespace,
    facts: dict[str, float | str],
) -> tuple[Path, Path | None]:
    """The cached archive of `instances` (also used by cfind_latency.py): our data folder,
    and Orthanc's storage when it is measured at this size (None otherwise)."""
    root = cache_root(instances, args.per_study, args.seed)
    root.mkdir(parents=True, exist_ok=True)
    log(
        f"== {instances:,} instances ({studies:,} studies), "
        f"{'ours and Orthanc' if with_orthanc else 'ours only'}; cache {root}"
    )
    if not with_orthanc:
        facts["ours_catalog"] = "catalog_synth.py Parquet batch files"
        return ensure_vannah_synth(root, instances, args, facts), None
    data = ensure_files(root, args, instances)
    orthanc_dir = ensure_orthanc(root, data, facts)
    data_dir = ensure_vannah_ingested(root, data, facts)
    facts["ours_catalog"] = "vannah import --ingest of the same files"
    return data_dir, orthanc_dir


def run_size(instances: int, args: argparse.Namespace) -> SizeResult:
    with_orthanc = instances <= args.orthanc_max and not args.ours_only
    plan = plan_archive(instances, args.per_study, args.seed)
    size = SizeResult(instances, with_orthanc, len(plan), query_kinds(plan))
    data_dir, orthanc_dir = prepare_archive(instances, len(plan), with_orthanc, args, size.facts)

    servers: list[OrthancServer | DicomWebServer] = []
    clients: dict[str, HttpClient] = {}
    with run_dir(f"qido-{instances}") as workdir:
        try:
            log("starting our DICOMweb service (loads the catalog before it listens)")
            ours = DicomWebServer(workdir / "vannah", data_dir, extra_env=OURS_ENV)
            servers.append(ours)
            ours.start()
            assert ours.proc is not None and ours.memory is not None
            size.facts["ours_ready_s"] = ours.ready_seconds
            size.facts["ours_rss_after_load"] = ours.memory.sample()
            size.facts["ours_peak_rss_load"] = ours.memory.peak_bytes
            log(
                f"  ready in {ours.ready_seconds:.1f} s, "
                f"RSS {size.facts['ours_rss_after_load'] / 2**20:.0f} MiB"
            )
            clients["vannah"] = HttpClient(ours.http_port)
            if orthanc_dir is not None:
                log("starting Orthanc on the cached storage")
                orthanc = OrthancServer(orthanc_dir, dicomweb=True)
                servers.append(orthanc)
                orthanc.start()
                assert orthanc.memory is not None
                size.facts["orthanc_rss_after_start"] = orthanc.memory.sample()
                clients["orthanc"] = HttpClient(orthanc.http_port)
            measure(size, clients, args)
            size.facts["ours_peak_rss"] = ours.memory.peak_bytes
            size.facts["ours_rss_end"] = ours.memory.sample()
            if orthanc_dir is not None:
                assert orthanc.memory is not None
                size.facts["orthanc_peak_rss"] = orthanc.memory.peak_bytes
        finally:
            with signals_deferred():
                for client in clients.values():
                    client.close()
                for server in servers:
                    server.stop()
    return size


# --------------------------------------------------------------------------- report


def report(sizes: list[SizeResult], args: argparse.Namespace) -> None:
    header = [
        "catalog",
        "query",
        "studies ours / Orthanc / plan",
        *LATENCY_HEADER,
    ]
    rows: list[list[str]] = []
    for size in sizes:
        for kind in size.kinds:
            ours = size.results[("vannah", kind.label)]
            ref = size.results.get(("orthanc", kind.label))
            row = [
                f"{size.instances:,} inst." + ("" if size.with_orthanc else " (ours only)"),
                kind.label,
                f"{ours.count} / {ref.count if ref else '-'} / {kind.expected}",
            ]
            row += latency_cells(ours, ref)
            rows.append(row)
    print_table(
        f"QIDO-RS /studies latency, {args.requests} requests per query after {args.warmup} "
        "warm-up, interleaved, one keep-alive client (per-request wall time to the last byte)",
        header,
        rows,
    )
    rows = []
    for size in sizes:
        f = size.facts
        rows.append(
            [
                f"{size.instances:,} inst. ({size.studies:,} studies)",
                str(f.get("ours_catalog", "-")),
                f"{float(f.get('ours_ready_s', 0)):.1f} s",
                mib(f.get("ours_rss_after_load")),
                mib(f.get("ours_peak_rss")),
                mib(f.get("orthanc_peak_rss")) if size.with_orthanc else "not run",
            ]
        )
    print_table(
        "Services: our DICOMweb startup (spawn to listening, catalog loaded) and memory "
        "(process RSS)",
        [
            "catalog",
            "our catalog built by",
            "our startup + load",
            "our RSS after load",
            "our peak RSS (load + queries)",
            "Orthanc peak RSS",
        ],
        rows,
    )
    if any(not s.with_orthanc for s in sizes):
        print(
            "\nOrthanc is measured at "
            f"{max((s.instances for s in sizes if s.with_orthanc), default=0):,} instances "
            "only: loading it by C-STORE beyond that takes too long (1M at ~540 inst/s is "
            "30+ minutes and its SQLite index slows as it grows)."
        )
    errors = [
        (s.instances, t, k, e)
        for s in sizes
        for (t, k), side in s.results.items()
        for e in side.errors[:3]
    ]
    mismatch = [
        (s.instances, k.label)
        for s in sizes
        if s.with_orthanc
        for k in s.kinds
        if s.results[("vannah", k.label)].count != s.results[("orthanc", k.label)].count
    ]
    if mismatch:
        print(f"\n**Count mismatch ours vs Orthanc:** {mismatch}")
    for instances, target, kind, error in errors:
        print(f"\nerror at {instances:,} / {target} / {kind}: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000],
        help="catalog sizes in instances",
    )
    parser.add_argument(
        "--orthanc-max",
        type=int,
        default=100_000,
        help="largest size Orthanc is loaded and measured at",
    )
    parser.add_argument("--ours-only", action="store_true", help="skip Orthanc at every size")
    parser.add_argument("--requests", type=int, default=50, help="timed requests per query")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per query")
    parser.add_argument("--per-study", type=int, default=100, help="instances per study")
    parser.add_argument(
        "--files", type=int, default=100, help="Parquet files of a directly written catalog"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2,000 (both) + 20,000 (ours) instances, 10 requests",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.orthanc_max, args.requests, args.warmup = [2000, 20_000], 2000, 10, 2
    install_signal_handlers()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sizes: list[SizeResult] = []
    try:
        for instances in args.sizes:
            sizes.append(run_size(instances, args))
    except KeyboardInterrupt:
        log("interrupted: servers stopped")
        return 130
    report(sizes, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "requests": args.requests,
            "warmup": args.warmup,
            "sizes": [
                {
                    "instances": s.instances,
                    "studies": s.studies,
                    "with_orthanc": s.with_orthanc,
                    "facts": s.facts,
                    "queries": [
                        {
                            "label": k.label,
                            "params": k.params,
                            "expected": k.expected,
                            **{
                                t: side.as_dict()
                                for (t, label), side in s.results.items()
                                if label == k.label
                            },
                        }
                        for k in s.kinds
                    ],
                }
                for s in sizes
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
