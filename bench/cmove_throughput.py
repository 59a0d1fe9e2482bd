"""C-MOVE (and C-GET) throughput of a whole CT study, our receiver and Orthanc side by side.

One synthetic CT study of `--instances` (default 500) instances of ~0.5 MB
(``synthetic_set(500, "ct")``) is in both archives, cached under
bench/out/cache/cmove-v1-<set>/:

* ours: sent with storescu to ``python -m receiver`` (the real C-STORE path), the receiver
  stopped (its landing batches sealed), then ``vannah --data-dir DIR ingest`` (catalog +
  hot tier); checked: every instance is in the hot tier.
* Orthanc (BASELINES.md configuration, plus ``DicomAlwaysAllowMove/Get``): loaded with
  storescu over 4 associations.

C-MOVE: a DCMTK ``storescp -aet STORESCP +B -od DIR`` (bit-preserving, one association,
``TCP_NODELAY=1``) is the destination, known to both (our ``VANNAH_DICOM_MODALITIES``,
Orthanc's ``DicomModalities``). Each run times the whole ``movescu`` process (start,
C-MOVE of the study, every sub-operation, final response, exit) and then checks that
storescp wrote every instance (the folder is emptied between runs). C-GET: ``getscu +B -od
DIR`` the same way, the instances coming back on the C-GET association. One untimed warm-up
per server and operation, then `--repeats` runs, alternating which server goes first.

    .venv/bin/python bench/cmove_throughput.py                  # 500 CT x 3 repeats
    .venv/bin/python bench/cmove_throughput.py --quick          # 50 CT x 1 repeat (smoke)
    .venv/bin/python bench/cmove_throughput.py --no-get --json bench/out/cmove.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    CALLING_AET,
    DATA_DIR,
    LABELS,
    NODELAY_ENV,
    OUT_DIR,
    REPO_ROOT,
    DataSet,
    OrthancServer,
    ReceiverServer,
    Series,
    Server,
    format_ratio,
    free_port,
    install_signal_handlers,
    log,
    print_table,
    run_dir,
    run_storescu,
    signals_deferred,
    synthetic_set,
)

CACHE_DIR = OUT_DIR / "cache"
DEST_AET = "STORESCP"
ORTHANC_QR = {
    "DicomAlwaysAllowFind": True,
    "DicomAlwaysAllowMove": True,
    "DicomAlwaysAllowGet": True,
}


@dataclass
class Figures:
    inst_per_s: Series = field(default_factory=Series)
    mb_per_s: Series = field(default_factory=Series)
    seconds: Series = field(default_factory=Series)
    received: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "inst_per_s": self.inst_per_s.as_dict(),
            "mb_per_s": self.mb_per_s.as_dict(),
            "seconds": self.seconds.as_dict(),
            "received": self.received,
            "errors": self.errors,
        }


class StoreScp(Server):
    """DCMTK storescp as the C-MOVE destination: bit-preserving, into `outdir`."""

    label = "storescp"
    aet = DEST_AET

    def __init__(self, workdir: Path, outdir: Path) -> None:
        super().__init__(workdir)
        self.outdir = outdir

    def _command(self) -> list[str]:
        self.dicom_port = free_port()
        self.outdir.mkdir(parents=True, exist_ok=True)
        return ["storescp", "-aet", DEST_AET, "+B", "-od", str(self.outdir), str(self.dicom_port)]

    def stored_instances(self) -> int:
        return sum(1 for p in self.outdir.iterdir() if p.is_file())


# --------------------------------------------------------------------------- data


def ensure_set(count: int) -> DataSet:
    """synthetic_set(count, "ct"), generated at low priority in a child process if missing."""
    if not (DATA_DIR / f"ct-{count}-s100" / ".complete").exists():
        log(f"generating {count:,} CT instances (~{count / 2:.0f} MB), niced")
        code = f"import common; common.synthetic_set({count}, 'ct')"
        bench = Path(__file__).resolve().parent
        subprocess.run(["nice", "-n", "10", sys.executable, "-c", code], cwd=bench, check=True)
    return synthetic_set(count, "ct")


def study_uid(data: DataSet) -> str:
    import pydicom

    return str(pydicom.dcmread(data.files[0], stop_before_pixels=True).StudyInstanceUID)


def cache_root(data: DataSet) -> Path:
    return CACHE_DIR / f"cmove-v1-{data.name}"


def hot_files(data_dir: Path) -> int:
    hot = data_dir / "hot"
    return sum(1 for p in hot.rglob("*.dcm") if p.is_file()) if hot.exists() else 0


def ensure_ours(data: DataSet) -> Path:
    """Our data folder: `data` sent to the receiver by storescu, then ingested; cached."""
    root = cache_root(data)
    data_dir, marker = root / "vannah", root / ".vannah-complete"
    if marker.exists():
        return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    log(f"loading {data.name} into our receiver (storescu, 1 association), then ingesting")
    with run_dir("cmove-load") as workdir:
        receiver = ReceiverServer(workdir, extra_env={"VANNAH_DATA_DIR": str(data_dir)})
        with receiver:
            result = run_storescu(data, port=receiver.dicom_port, called_aet=receiver.aet)
        # Stopped: the workers sealed their batches.
    log(f"  stored in {result.seconds:.1f} s; ingesting")
    subprocess.run(
        [sys.executable, "-m", "vannah_pipelines.cli", "--data-dir", str(data_dir), "ingest"],
        cwd=REPO_ROOT,
        check=True,
        stdout=sys.stderr,
    )
    found = hot_files(data_dir)
    if found != len(data.files):
        raise RuntimeError(f"hot tier holds {found} of {len(data.files)} instances")
    marker.touch()
    return data_dir


def ensure_orthanc(data: DataSet) -> Path:
    """Orthanc's working folder with `data` loaded (storescu, 4 associations); cached."""
    root = cache_root(data)
    workdir, marker = root / "orthanc", root / ".orthanc-complete"
    if marker.exists():
        return workdir
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"loading {data.name} into Orthanc (storescu, 4 associations)")
    with OrthancServer(workdir) as orthanc:
        run_storescu(data, port=orthanc.dicom_port, called_aet=orthanc.aet, associations=4)
        stored = orthanc.stored_instances()
    if stored != len(data.files):
        raise RuntimeError(f"Orthanc stored {stored} of {len(data.files)} instances")
    marker.touch()
    return workdir


# --------------------------------------------------------------------------- measuring


def dcmtk(cmd: list[str], timeout: float = 600.0) -> tuple[float, str]:
    """Run a DCMTK client with Nagle off; return (wall seconds, problem or "")."""
    started = time.perf_counter()
    proc = subprocess.run(
        cmd,
        env={**os.environ, **NODELAY_ENV},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.perf_counter() - started
    text = proc.stdout + proc.stderr
    lines = text.splitlines()
    bad = [ln for ln in lines if ln.startswith(("E:", "F:"))]
    if cmd[0] == "movescu":
        finals = [ln for ln in lines if "Final Move Response" in ln]
        ok = bool(finals) and "(Success)" in finals[-1]
    else:  # getscu -v: "Final status report from last C-GET message:" then the counts
        finals = [ln for ln in lines if "Final status report" in ln]
        failed = [ln for ln in lines if "Number of Failed Suboperations" in ln]
        ok = bool(finals) and bool(failed) and failed[-1].rstrip().endswith(": 0")
    problem = ""
    if proc.returncode != 0 or bad or not ok:
        problem = f"{cmd[0]} exit {proc.returncode}: " + "; ".join((finals[-1:] + bad)[:3])
    return seconds, problem


def move_cmd(server: Server, uid: str) -> list[str]:
    return [
        "movescu", "-v", "-S",
        "-aet", CALLING_AET, "-aec", server.aet, "-aem", DEST_AET,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
        "127.0.0.1", str(server.dicom_port),
    ]  # fmt: skip


def get_cmd(server: Server, uid: str, outdir: Path) -> list[str]:
    return [
        "getscu", "-v", "-S",
        "-aet", CALLING_AET, "-aec", server.aet,
        "+B", "-od", str(outdir),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
        "127.0.0.1", str(server.dicom_port),
    ]  # fmt: skip


def empty(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            path.unlink()


def one_run(
    op: str, server: Server, uid: str, outdir: Path, expected: int, figures: Figures | None
) -> None:
    """One C-MOVE or C-GET of the study; recorded in `figures` unless None (warm-up)."""
    empty(outdir)
    cmd = move_cmd(server, uid) if op == "C-MOVE" else get_cmd(server, uid, outdir)
    seconds, problem = dcmtk(cmd)
    files = [p for p in outdir.iterdir() if p.is_file()]
    nbytes = sum(p.stat().st_size for p in files)
    if len(files) != expected:
        problem = (problem + "; " if problem else "") + f"received {len(files)} of {expected}"
    tag = "warm-up" if figures is None else "run"
    log(
        f"  {op} {server.label} {tag}: {len(files)} files, {nbytes / 1e6:.0f} MB in "
        f"{seconds:.2f} s ({len(files) / seconds:.0f} inst/s){'  ' + problem if problem else ''}"
    )
    if figures is None:
        if problem:
            raise RuntimeError(
                f"{op} warm-up from {server.label} failed: {problem}\n{server.log_tail()}"
            )
        return
    figures.received.append(len(files))
    if problem:
        figures.errors.append(problem)
        return
    figures.inst_per_s.add(len(files) / seconds)
    figures.mb_per_s.add(nbytes / 1e6 / seconds)
    figures.seconds.add(seconds)


def run(
    args: argparse.Namespace,
) -> tuple[DataSet, dict[tuple[str, str], Figures], dict[str, float]]:
    data = ensure_set(args.instances)
    uid = study_uid(data)
    targets = [t for t in ("vannah", "orthanc") if t in args.only]
    ours_dir = ensure_ours(data) if "vannah" in targets else None
    orthanc_dir = ensure_orthanc(data) if "orthanc" in targets else None
    ops = ["C-MOVE"] + ([] if args.no_get else ["C-GET"])
    results = {(op, t): Figures() for op in ops for t in targets}
    facts: dict[str, float] = {}
    servers: dict[str, Server] = {}
    with run_dir("cmove") as workdir:
        dest_dir, get_dir = workdir / "storescp-out", workdir / "getscu-out"
        get_dir.mkdir()
        scp = StoreScp(workdir / "storescp", dest_dir)
        try:
            scp.start()
            modality = [DEST_AET, "127.0.0.1", scp.dicom_port]
            if ours_dir is not None:
                servers["vannah"] = ReceiverServer(
                    workdir / "vannah",
                    extra_env={
                        "VANNAH_DATA_DIR": str(ours_dir),
                        # movescu/getscu's AE title is a known peer: with DicomModalities
                        # set, unknown AE titles may only store and echo (as Orthanc
                        # without its DicomAlwaysAllowMove/Get).
                        "VANNAH_DICOM_MODALITIES": json.dumps(
                            {"dest": modality, "scu": [CALLING_AET, "127.0.0.1", 104]}
                        ),
                        **dict(args.receiver_env),
                    },
                )
            if orthanc_dir is not None:
                servers["orthanc"] = OrthancServer(
                    orthanc_dir, extra_config={**ORTHANC_QR, "DicomModalities": {"dest": modality}}
                )
            for server in servers.values():
                server.start()
            for op in ops:
                outdir = dest_dir if op == "C-MOVE" else get_dir
                for target in targets:  # warm-up: catalog load, page cache
                    one_run(op, servers[target], uid, outdir, len(data.files), None)
                for r in range(args.repeats):
                    order = targets if r % 2 == 0 else targets[::-1]
                    for target in order:
                        one_run(
                            op, servers[target], uid, outdir, len(data.files), results[(op, target)]
                        )
                if "vannah" in servers:
                    # Sub-operations our receiver had to re-encode (no context with the stored
                    # transfer syntax accepted by the peer): counted from its log so far.
                    text = servers["vannah"].log_path.read_text(errors="replace")
                    facts[f"vannah_reencoded_through_{op}"] = text.count(" re-encoded")
            for target, server in servers.items():
                assert server.memory is not None
                facts[f"{target}_peak_rss"] = server.memory.peak_bytes
        finally:
            with signals_deferred():
                for server in [*servers.values(), scp]:
                    server.stop()
    return data, results, facts


# --------------------------------------------------------------------------- report


def report(
    data: DataSet,
    results: dict[tuple[str, str], Figures],
    facts: dict[str, float],
    args: argparse.Namespace,
) -> list[str]:
    header = [
        "operation",
        "server",
        "inst/s",
        "MB/s",
        "seconds",
        "received / expected",
        "ours/Orthanc (inst/s)",
    ]
    rows = []
    for (op, target), fig in results.items():
        ref = results.get((op, "orthanc"))
        ratio = "-"
        if target == "vannah" and ref and ref.inst_per_s.values and fig.inst_per_s.values:
            ratio = format_ratio(fig.inst_per_s.median, ref.inst_per_s.median)
        rows.append(
            [
                op,
                LABELS[target],
                fig.inst_per_s.summary(".0f"),
                fig.mb_per_s.summary(".0f"),
                fig.seconds.summary(".2f"),
                ", ".join(f"{n}" for n in fig.received) + f" / {len(data.files)}",
                ratio,
            ]
        )
    print_table(
        f"C-MOVE to DCMTK storescp (+B, TCP_NODELAY=1) and C-GET (getscu +B) of one "
        f"{len(data.files)}-instance CT study ({data.total_bytes / 1e6:.0f} MB, "
        f"{data.mean_bytes / 1e6:.2f} MB each), whole movescu/getscu process timed, "
        f"median (min-max) of {args.repeats} runs after 1 warm-up, order alternating",
        header,
        rows,
    )
    mib = lambda v: f"{v / 2**20:.0f} MiB"  # noqa: E731
    peaks = {k.removesuffix("_peak_rss"): v for k, v in facts.items() if k.endswith("_peak_rss")}
    print(
        "\nPeak RSS: "
        + ", ".join(f"{LABELS[k]} {mib(v)}" for k, v in peaks.items())
        + " (process tree; ours: supervisor + workers)."
    )
    reencoded = {k: int(v) for k, v in facts.items() if k.startswith("vannah_reencoded")}
    if reencoded:
        print(
            "\nOur sub-operations re-encoded because the peer accepted no context in the "
            "stored transfer syntax (cumulative over warm-up + runs): "
            + ", ".join(f"after {k.rsplit('_', 1)[1]}: {v}" for k, v in reencoded.items())
            + "."
        )
    problems = [f"{op} / {t}: {e}" for (op, t), fig in results.items() for e in fig.errors]
    if problems:
        print("\n**Problems:**\n")
        for problem in problems:
            print(f"- {problem}")
    else:
        print(f"\nEvery run delivered all {len(data.files)} instances.")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=500, help="instances in the CT study")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per server and op")
    parser.add_argument("--no-get", action="store_true", help="C-MOVE only, skip C-GET")
    parser.add_argument(
        "--only", choices=["vannah", "orthanc"], nargs="+", default=["vannah", "orthanc"]
    )
    parser.add_argument(
        "--receiver-env",
        action="append",
        default=[],
        type=lambda s: tuple(s.split("=", 1)),
        metavar="NAME=VALUE",
        help="extra VANNAH_* setting for our receiver (repeatable)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 CT x 1 repeat")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.instances, args.repeats = 50, 1
    install_signal_handlers()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        data, results, facts = run(args)
    except KeyboardInterrupt:
        log("interrupted: servers stopped")
        return 130
    problems = report(data, results, facts, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "data_set": data.name,
            "instances": len(data.files),
            "total_bytes": data.total_bytes,
            "repeats": args.repeats,
            "facts": facts,
            "problems": problems,
            "results": {f"{op}/{t}": fig.as_dict() for (op, t), fig in results.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
