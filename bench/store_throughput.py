"""C-STORE ingest throughput, Orthanc and our receiver side by side in one run.

Sends N synthetic CT instances (~0.5 MB, explicit VR LE) with DCMTK storescu over 1 and over
4 parallel associations, to a fresh Orthanc (the BASELINES.md reference configuration) and to
a fresh ``python -m receiver``, alternating which goes first on each repeat. Prints
instances/s and MB/s as ``median (min-max)``, the paired ratio ours/Orthanc, and each
server's peak memory (summed RSS of its process tree) under the 4-association load.

    .venv/bin/python bench/store_throughput.py                  # 1,000 CT x 3 repeats
    .venv/bin/python bench/store_throughput.py --quick          # 50 CT x 1 repeat (smoke)
    .venv/bin/python bench/store_throughput.py --only orthanc --json bench/out/store.json
    # the receiver without its storage fast path (every association through pynetdicom):
    .venv/bin/python bench/store_throughput.py --receiver-env VANNAH_RECEIVER_FAST_STORE=false
    # over DICOM TLS (both servers: same CA, certificate, key and client certificate):
    .venv/bin/python bench/store_throughput.py --tls
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    LABELS,
    REPO_ROOT,
    DataSet,
    Series,
    Server,
    TlsFiles,
    format_mb,
    format_ratio,
    install_signal_handlers,
    make_server,
    print_table,
    run_dir,
    run_storescu,
    synthetic_set,
)

TARGETS = ("orthanc", "vannah")
ASSOCIATIONS = (1, 4)


@dataclass
class Figures:
    """All repeats of one (target, associations) cell."""

    inst_per_s: Series = field(default_factory=Series)
    mb_per_s: Series = field(default_factory=Series)
    peak_rss: Series = field(default_factory=Series)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1000, help="CT instances per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per target and load")
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 instances, 1 repeat")
    parser.add_argument("--only", choices=TARGETS, help="benchmark one target only")
    parser.add_argument(
        "--associations",
        type=int,
        nargs="+",
        default=list(ASSOCIATIONS),
        help="parallel association counts to test (default: 1 4)",
    )
    parser.add_argument(
        "--orthanc-dicomweb", action="store_true", help="load Orthanc's DICOMweb plugin"
    )
    parser.add_argument(
        "--receiver-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the receiver, e.g. VANNAH_RECEIVER_WORKERS=2",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="DICOM TLS on both servers (Orthanc's DicomTls* keys), storescu +tls with a "
        "client certificate",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.instances, args.repeats = 50, 1
    for item in args.receiver_env:
        if "=" not in item:
            parser.error(f"--receiver-env expects KEY=VALUE, got {item!r}")
    return args


def count_stored(server: Server, expected: int, settle_s: float = 5.0) -> int:
    """Instances the server holds after the run (not part of the timing). A receiver batch
    renamed from ``open/`` to ``sealed/`` while the landing folder is scanned is missed by
    that scan, so rescan for a few seconds until `expected` are seen."""
    deadline = time.monotonic() + settle_s
    while True:
        stored = server.stored_instances()
        if stored >= expected or time.monotonic() > deadline:
            return stored
        time.sleep(0.1)


def run_once(
    target: str,
    data: DataSet,
    associations: int,
    args: argparse.Namespace,
    tls: TlsFiles | None = None,
) -> tuple[float, float, int]:
    """One fresh server, one load; returns (instances/s, MB/s, peak RSS bytes)."""
    with run_dir(f"store-{target}-{associations}x") as workdir:
        server = make_server(
            target,
            workdir,
            dicomweb=args.orthanc_dicomweb,
            receiver_env=dict(item.split("=", 1) for item in args.receiver_env),
            tls=tls,
        )
        with server:
            result = run_storescu(
                data,
                port=server.dicom_port,
                called_aet=server.aet,
                associations=associations,
                logdir=workdir,
                tls=tls,
            )
            stored = count_stored(server, len(data.files))
            assert server.memory is not None
            peak = max(server.memory.peak_bytes, server.memory.sample())
        if stored != len(data.files):
            raise RuntimeError(
                f"{target}: storescu succeeded but {stored} of {len(data.files)} instances stored"
            )
    print(
        f"  {LABELS[target]:8} {associations}x: {result.instances_per_s:7.1f} inst/s "
        f"{result.mb_per_s:6.1f} MB/s  {result.seconds:6.2f} s  peak {format_mb(peak)}",
        file=sys.stderr,
    )
    return result.instances_per_s, result.mb_per_s, peak


def paired_ratios(ours: Series, ref: Series) -> Series:
    """Per-repeat ratios ours/reference (runs of one repeat ran back to back)."""
    return Series([o / r for o, r in zip(ours.values, ref.values, strict=True) if r > 0])


def report(
    figures: dict[tuple[str, int], Figures],
    targets: list[str],
    data: DataSet,
    args: argparse.Namespace,
) -> None:
    both = len(targets) == 2
    header = ["test", *(LABELS[t] for t in targets)]
    if both:
        header.append("ours / Orthanc")
    rows: list[list[str]] = []
    for k in args.associations:
        for metric, unit, fmt in (("inst_per_s", "inst/s", ".0f"), ("mb_per_s", "MB/s", ".0f")):
            tls = " over TLS" if args.tls else ""
            row = [f"C-STORE{tls} {len(data.files):,} CT, {k} assoc., {unit}"]
            cells = {t: getattr(figures[t, k], metric) for t in targets}
            row += [cells[t].summary(fmt) for t in targets]
            if both:
                row.append(paired_ratios(cells["vannah"], cells["orthanc"]).summary(".2f", "x"))
            rows.append(row)
    k_max = max(args.associations)
    peaks = {t: figures[t, k_max].peak_rss for t in targets}
    row = [f"peak memory (process tree RSS), {k_max} assoc., MiB"]
    row += [Series([v / 2**20 for v in peaks[t].values]).summary(".0f") for t in targets]
    if both:
        row.append(format_ratio(peaks["vannah"].median, peaks["orthanc"].median))
    rows.append(row)
    print_table(
        f"C-STORE throughput: {len(data.files):,} CT instances "
        f"({data.total_bytes / 1e6:.0f} MB, {data.mean_bytes / 1e3:.0f} kB each), "
        f"{args.repeats} repeat(s), median (min-max)",
        header,
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    targets = [args.only] if args.only else list(TARGETS)
    if "vannah" in targets and not (REPO_ROOT / "receiver" / "__main__.py").exists():
        print("receiver/__main__.py is missing: run with --only orthanc", file=sys.stderr)
        return 2
    data = synthetic_set(args.instances, "ct")
    tls = None
    if args.tls:
        tls = TlsFiles.create(Path(tempfile.mkdtemp(prefix="store-tls-")))
    figures = {(t, k): Figures() for t in targets for k in args.associations}
    try:
        for repeat in range(args.repeats):
            order = targets if repeat % 2 == 0 else targets[::-1]
            print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
            for k in args.associations:
                for target in order:
                    inst_s, mb_s, peak = run_once(target, data, k, args, tls)
                    cell = figures[target, k]
                    cell.inst_per_s.add(inst_s)
                    cell.mb_per_s.add(mb_s)
                    cell.peak_rss.add(peak)
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    report(figures, targets, data, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "instances": len(data.files),
            "total_bytes": data.total_bytes,
            "repeats": args.repeats,
            "results": {
                f"{t}/{k}": {
                    "inst_per_s": f.inst_per_s.as_dict(),
                    "mb_per_s": f.mb_per_s.as_dict(),
                    "peak_rss_bytes": f.peak_rss.as_dict(),
                }
                for (t, k), f in figures.items()
            },
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
