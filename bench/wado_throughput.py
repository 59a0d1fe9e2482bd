"""WADO-RS whole-study retrieve throughput, our DICOMweb service and Orthanc side by side.

One synthetic CT study of `--instances` (default 500) instances of ~0.5 MB
(``synthetic_set(500, "ct")``) is loaded into a fresh Orthanc with its DICOMweb plugin
(storescu, 4 associations) and into our data folder through ``vannah import --ingest``
(cached under bench/out/cache/). The client, in this process, sends
``GET /dicom-web/studies/{uid}`` with ``Accept: multipart/related; type="application/dicom";
transfer-syntax=*`` to ours and ``type="application/dicom"`` to Orthanc, reads the whole
streamed body over a keep-alive connection, counts its parts, and times it to the last byte;
one untimed warm-up each, then `--repeats` interleaved runs (the order alternates).

Bounded memory: ours also streams a `--big` study (default 4,000 instances, ~2.1 GB, distinct
SOP Instance UIDs, ours only), and the peak RSS of the service (the kernel's VmHWM, reset
before each retrieve) is compared with its peak while streaming the 500-instance study.

    .venv/bin/python bench/wado_throughput.py                   # 500 CT x 5, big 4,000 x 2
    .venv/bin/python bench/wado_throughput.py --quick           # 50 CT x 1, big 400 x 1
    .venv/bin/python bench/wado_throughput.py --json bench/out/wado.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    BENCH_DIR,
    DATA_DIR,
    OUT_DIR,
    DataSet,
    DicomWebServer,
    HttpClient,
    MemorySampler,
    OrthancServer,
    Series,
    format_ratio,
    install_signal_handlers,
    log,
    peak_rss_bytes,
    peak_rss_reset,
    print_table,
    run_dir,
    run_storescu,
    signals_deferred,
    synthetic_set,
    vannah_import,
)

CACHE_DIR = OUT_DIR / "cache"
ACCEPT = {
    "vannah": 'multipart/related; type="application/dicom"; transfer-syntax=*',
    "orthanc": 'multipart/related; type="application/dicom"',
}


@dataclass
class Figures:
    mb_per_s: Series = field(default_factory=Series)
    seconds: Series = field(default_factory=Series)
    peak_rss: Series = field(default_factory=Series)
    parts: list[int] = field(default_factory=list)
    nbytes: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "mb_per_s": self.mb_per_s.as_dict(),
            "seconds": self.seconds.as_dict(),
            "peak_rss_bytes": self.peak_rss.as_dict(),
            "parts": self.parts,
            "body_bytes": self.nbytes,
            "errors": self.errors,
        }


# --------------------------------------------------------------------------- data


def ensure_set(count: int) -> DataSet:
    """synthetic_set(count, "ct"), generated at low priority in a child process if missing."""
    if not (DATA_DIR / f"ct-{count}-s100" / ".complete").exists():
        log(f"generating {count:,} CT instances (~{count / 2:.0f} MB), niced")
        code = f"import common; common.synthetic_set({count}, 'ct')"
        subprocess.run(["nice", "-n", "10", sys.executable, "-c", code], cwd=BENCH_DIR, check=True)
    return synthetic_set(count, "ct")


def study_uid(data: DataSet) -> str:
    import pydicom

    return str(pydicom.dcmread(data.files[0], stop_before_pixels=True).StudyInstanceUID)


def ensure_ours(sets: list[DataSet]) -> Path:
    """Our data folder with every set imported and ingested (the real path), cached."""
    root = CACHE_DIR / ("wado-v1-" + "-".join(s.name for s in sets))
    data_dir, marker = root / "vannah", root / ".complete"
    if marker.exists():
        return data_dir
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for data in sets:
        log(f"importing + ingesting {data.name} into our data folder, niced")
        started = time.monotonic()
        vannah_import(data_dir, data.folder / "files")
        log(f"  done in {time.monotonic() - started:.0f} s")
    marker.touch()
    return data_dir


# --------------------------------------------------------------------------- measuring


class PartCounter:
    """Counts multipart delimiters in a streamed body (across chunk edges)."""

    def __init__(self, content_type: str) -> None:
        boundary = ""
        for piece in content_type.split(";")[1:]:
            name, _, value = piece.partition("=")
            if name.strip().lower() == "boundary":
                boundary = value.strip().strip('"')
        self.delimiter = b"--" + boundary.encode() if boundary else b""
        self.count = 0
        self._tail = b""

    def __call__(self, chunk: bytes) -> None:
        if not self.delimiter:
            return
        data = self._tail + chunk
        self.count += data.count(self.delimiter)
        keep = len(self.delimiter) - 1
        self._tail = data[-keep:] if keep else b""

    @property
    def parts(self) -> int:
        return max(0, self.count - 1)  # the closing delimiter is counted too


def retrieve(
    client: HttpClient,
    target: str,
    uid: str,
    figures: Figures | None,
    pid: int,
    sampler: MemorySampler,
) -> None:
    """One whole-study retrieve; recorded in `figures` unless it is None (warm-up)."""
    counter: list[PartCounter] = []
    hwm = peak_rss_reset(pid)
    sampler.reset()
    result = client.get(
        f"/dicom-web/studies/{uid}",
        {"Accept": ACCEPT[target]},
        keep_body=False,
        # Content-Type (and its boundary) is known once the headers are in.
        on_response=lambda r: counter.append(PartCounter(r.getheader("Content-Type", ""))),
        on_chunk=lambda chunk: counter[0](chunk),
    )
    nbytes, seconds = result.nbytes, result.seconds
    peak = peak_rss_bytes(pid) if hwm else sampler.peak_bytes
    if figures is None:
        return
    if result.status != 200:
        figures.errors.append(f"HTTP {result.status}")
        return
    figures.mb_per_s.add(nbytes / 1e6 / seconds)
    figures.seconds.add(seconds)
    figures.peak_rss.add(peak)
    figures.parts.append(counter[0].parts)
    figures.nbytes = nbytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=500, help="CT instances in the study")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--big", type=int, default=4000, help="instances of the big study (ours only; 0: skip)"
    )
    parser.add_argument("--big-repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke: 50 CT x 1, big 400 x 1")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.instances, args.repeats, args.big, args.big_repeats = 50, 1, 400, 1
    install_signal_handlers()

    data = ensure_set(args.instances)
    big = ensure_set(args.big) if args.big else None
    data_dir = ensure_ours([data, *([big] if big else [])])
    uid, big_uid = study_uid(data), (study_uid(big) if big else "")
    figures = {t: Figures() for t in ("vannah", "orthanc")}
    big_figures = Figures()
    facts: dict[str, float] = {}
    servers: list[OrthancServer | DicomWebServer] = []
    clients: dict[str, HttpClient] = {}
    try:
        with run_dir("wado") as workdir:
            try:
                orthanc = OrthancServer(workdir / "orthanc", dicomweb=True)
                servers.append(orthanc)
                orthanc.start()
                log(f"loading {len(data.files)} CT into Orthanc (storescu, 4 associations)")
                run_storescu(
                    data,
                    port=orthanc.dicom_port,
                    called_aet=orthanc.aet,
                    associations=4,
                    logdir=workdir,
                )
                ours = DicomWebServer(workdir / "vannah", data_dir)
                servers.append(ours)
                ours.start()
                assert ours.proc and ours.memory and orthanc.proc and orthanc.memory
                facts["ours_rss_idle"] = ours.memory.sample()
                facts["orthanc_rss_idle"] = orthanc.memory.sample()
                pids = {"vannah": ours.proc.pid, "orthanc": orthanc.proc.pid}
                samplers = {"vannah": ours.memory, "orthanc": orthanc.memory}
                clients = {
                    "vannah": HttpClient(ours.http_port),
                    "orthanc": HttpClient(orthanc.http_port),
                }
                order = ["vannah", "orthanc"]
                for t in order:  # warm-up: page cache, imports, connection
                    retrieve(clients[t], t, uid, None, pids[t], samplers[t])
                for i in range(args.repeats):
                    for t in order if i % 2 == 0 else order[::-1]:
                        retrieve(clients[t], t, uid, figures[t], pids[t], samplers[t])
                        log(
                            f"  {t} #{i + 1}: {figures[t].mb_per_s.values[-1]:.0f} MB/s, "
                            f"{figures[t].parts[-1]} parts, peak RSS "
                            f"{figures[t].peak_rss.values[-1] / 2**20:.0f} MiB"
                        )
                if big:
                    log(f"ours: streaming the {args.big:,}-instance study")
                    retrieve(
                        clients["vannah"],
                        "vannah",
                        big_uid,
                        None,
                        pids["vannah"],
                        samplers["vannah"],
                    )
                    for i in range(args.big_repeats):
                        retrieve(
                            clients["vannah"],
                            "vannah",
                            big_uid,
                            big_figures,
                            pids["vannah"],
                            samplers["vannah"],
                        )
                        log(
                            f"  big #{i + 1}: {big_figures.mb_per_s.values[-1]:.0f} MB/s, "
                            f"{big_figures.parts[-1]} parts, peak RSS "
                            f"{big_figures.peak_rss.values[-1] / 2**20:.0f} MiB"
                        )
            finally:
                with signals_deferred():
                    for client in clients.values():
                        client.close()
                    for server in servers:
                        server.stop()
    except KeyboardInterrupt:
        log("interrupted: servers stopped")
        return 130

    mib = lambda v: f"{v / 2**20:.0f}"  # noqa: E731
    mb = figures["vannah"].nbytes / 1e6
    rows = [
        [
            f"WADO-RS study, {len(data.files)} CT ({mb:.0f} MB body), MB/s",
            figures["vannah"].mb_per_s.summary(".0f"),
            figures["orthanc"].mb_per_s.summary(".0f"),
            format_ratio(figures["vannah"].mb_per_s.median, figures["orthanc"].mb_per_s.median),
        ],
        [
            "same, seconds to the last byte",
            figures["vannah"].seconds.summary(".2f"),
            figures["orthanc"].seconds.summary(".2f"),
            format_ratio(figures["vannah"].seconds.median, figures["orthanc"].seconds.median),
        ],
        [
            "parts received (expected " + str(len(data.files)) + ")",
            "/".join(map(str, sorted(set(figures["vannah"].parts)))),
            "/".join(map(str, sorted(set(figures["orthanc"].parts)))),
            "",
        ],
        [
            "RSS idle (after start), MiB",
            mib(facts["ours_rss_idle"]),
            mib(facts["orthanc_rss_idle"]),
            format_ratio(facts["ours_rss_idle"], facts["orthanc_rss_idle"]),
        ],
        [
            f"peak RSS while streaming {len(data.files)} CT, MiB",
            Series([v / 2**20 for v in figures["vannah"].peak_rss.values]).summary(".0f"),
            Series([v / 2**20 for v in figures["orthanc"].peak_rss.values]).summary(".0f"),
            format_ratio(figures["vannah"].peak_rss.median, figures["orthanc"].peak_rss.median),
        ],
    ]
    if big:
        growth = big_figures.peak_rss.median - figures["vannah"].peak_rss.median
        rows += [
            [
                f"WADO-RS study, {args.big:,} CT ({big_figures.nbytes / 1e9:.2f} GB body), MB/s",
                big_figures.mb_per_s.summary(".0f"),
                "not run",
                "",
            ],
            [
                f"parts received (expected {args.big:,})",
                "/".join(map(str, sorted(set(big_figures.parts)))),
                "",
                "",
            ],
            [
                f"peak RSS while streaming {args.big:,} CT, MiB",
                Series([v / 2**20 for v in big_figures.peak_rss.values]).summary(".0f"),
                "not run",
                "",
            ],
            [
                f"peak RSS growth {len(data.files)} -> {args.big:,} CT, MiB",
                f"{growth / 2**20:+.0f}",
                "",
                "",
            ],
        ]
    print_table(
        f"WADO-RS retrieve of a whole study, {args.repeats} interleaved repeat(s) after one "
        "warm-up, median (min-max); peak RSS = kernel VmHWM of the server process, reset "
        "before each retrieve",
        ["test", "Vannah", "Orthanc", "ours / Orthanc"],
        rows,
    )
    errors = {t: f.errors for t, f in figures.items() if f.errors}
    if big_figures.errors:
        errors["vannah-big"] = big_figures.errors
    if errors:
        print(f"\nerrors: {errors}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "instances": len(data.files),
                    "study_bytes": data.total_bytes,
                    "big_instances": args.big,
                    "repeats": args.repeats,
                    "facts": facts,
                    "results": {t: f.as_dict() for t, f in figures.items()},
                    "big": big_figures.as_dict(),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
