"""C-FIND study-level latency, our receiver and Orthanc side by side.

The archive is the one bench/qido_latency.py builds (bench/catalog_synth.py plan: 100
instances per study, patients with 1-5 studies, varied name initials, dates over 2019-2023)
and the same three study-level queries: a PatientID match (a patient with one study), a
StudyDate range of one month, and a PatientName wildcard ``A*``. Its caches are reused (and
built through qido_latency.py's functions when missing):

* 100,000 instances: Orthanc (BASELINES.md configuration, plus ``DicomAlwaysAllowFind``)
  on its cached storage + SQLite index, and our receiver on the data folder made by
  ``vannah import --ingest`` of the same files.
* 1,000,000 instances: ours only, on the catalog written directly by catalog_synth.py.
  Orthanc is not loaded at this size: by C-STORE at ~540 inst/s it takes 30+ minutes and
  its SQLite index slows as it grows.

Two clients, both with Nagle off (``TCP_NODELAY=1`` in the environment of findscu and
Orthanc; our receiver sets it on its sockets):

* ``findscu``: the whole DCMTK process per query (start, associate, C-FIND, read every
  answer, release, exit), as BASELINES.md measured Orthanc's 40 ms.
* ``pynetdicom``: one association per server kept open in this process, time from sending
  the C-FIND to the final response (the server's own latency, without process and
  association setup).

Our receiver loads its catalog on the first C-FIND in each worker process, so it is warmed
up (PatientID queries) until answers come back fast 8 times in a row; the first answer's
time is reported as the load time. Then per query: `--warmup` untimed and `--requests`
timed runs per server, interleaved (the order alternates). Prints p50 / p95 / min-max and
the ratios ours/Orthanc, the studies each side answered (they must agree at 100,000: the
counts and the StudyInstanceUID sets are compared) and the plan's count.

    .venv/bin/python bench/cfind_latency.py                     # 100k (both) + 1M (ours)
    .venv/bin/python bench/cfind_latency.py --quick             # 2k (both) + 20k, smoke
    .venv/bin/python bench/cfind_latency.py --requests 50 --json bench/out/cfind.json

``--small`` measures what a modality sees on a small archive: 20,000 instances, the whole
DCMTK process only (association, one request, release), 30 runs per request interleaved
with Orthanc: the three study-level queries, a Modality Worklist query (``findscu -W`` for
the CT steps of a few worklist items, which both servers hold: Orthanc through its
ModalityWorklists plugin on ``.wl`` files, ours imported from the same files by ``vannah
worklist import``) and, for reference, a C-ECHO (``echoscu``).

    .venv/bin/python bench/cfind_latency.py --small
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from catalog_synth import QueryKind, plan_archive, query_kinds
from common import (
    CALLING_AET,
    LATENCY_HEADER,
    NODELAY_ENV,
    OrthancServer,
    ReceiverServer,
    Server,
    Side,
    install_signal_handlers,
    latency_cells,
    log,
    mib,
    niced,
    print_table,
    run_dir,
    signals_deferred,
)
from qido_latency import prepare_archive

ORTHANC_QR = {
    "DicomAlwaysAllowFind": True,
    "DicomAlwaysAllowMove": True,
    "DicomAlwaysAllowGet": True,
}
# Return keys of a typical viewer study list.
RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
CLIENTS = ("findscu", "pynetdicom")
UID_LINE = re.compile(r"\(0020,000d\) UI \[([0-9.]+)")
SMALL_SIZE = 20_000
ECHO_LABEL = "C-ECHO (echoscu)"
WORKLIST_LABEL = "MWL findscu -W, Modality=CT"
WORKLIST_PLUGIN = "/usr/share/orthanc/plugins/libModalityWorklists.so"
# (modality, accession number) of the worklist items both servers hold; CT ones match.
WORKLIST_STEPS = (("CT", "BENCHACC1"), ("CT", "BENCHACC2"), ("MR", "BENCHACC3"),
                  ("CT", "BENCHACC4"), ("US", "BENCHACC5"))  # fmt: skip
WORKLIST_DATE = "20301231"  # in the future: never past due (worklist_past_due_hours)
# What a modality asks for (IHE SWF RAD-5), as sequence paths inside the SPS item.
WORKLIST_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyInstanceUID",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "ScheduledProcedureStepSequence[0].Modality=CT",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription",
)
ACCESSION_LINE = re.compile(r"\(0008,0050\) SH \[([^\]]*)\]")


@dataclass
class SizeResult:
    instances: int
    with_orthanc: bool
    studies: int
    kinds: list[QueryKind]
    results: dict[tuple[str, str, str], Side] = field(default_factory=dict)  # client, target, kind
    clients: tuple[str, ...] = CLIENTS
    facts: dict[str, float | str] = field(default_factory=dict)


# --------------------------------------------------------------------------- clients


def findscu(
    server: Server, params: dict[str, str], timeout: float = 900.0, *, worklist: bool = False
) -> tuple[float, int, set[str], str]:
    """Run one findscu process (``-W`` for `worklist`: the worklist keys, `params` unused);
    return (seconds, answers, StudyInstanceUIDs or worklist AccessionNumbers, error)."""
    if worklist:
        keys = ["-W"]
        for key in WORKLIST_KEYS:
            keys += ["-k", key]
    else:
        keys = ["-S", "-k", "QueryRetrieveLevel=STUDY"]
        for keyword in RETURN_KEYS:
            value = params.get(keyword)
            keys += ["-k", f"{keyword}={value}" if value else keyword]
    cmd = [
        "findscu", "-v",
        "-aet", CALLING_AET, "-aec", server.aet,
        "-td", str(int(timeout)),
        *keys,
        "127.0.0.1", str(server.dicom_port),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(
        cmd,
        env={**os.environ, **NODELAY_ENV},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    seconds = time.perf_counter() - started
    text = proc.stdout + proc.stderr
    error = ""
    if proc.returncode != 0 or "Final Find Response (Success)" not in text:
        bad = [ln for ln in text.splitlines() if ln.startswith(("E:", "F:")) or "Final" in ln]
        error = f"findscu exit {proc.returncode}: " + "; ".join(bad[:3])
    found = ACCESSION_LINE.findall(text) if worklist else UID_LINE.findall(text)
    return seconds, text.count("(Pending)"), {value.strip() for value in found}, error


def echoscu(server: Server, timeout: float = 60.0) -> tuple[float, int, set[str], str]:
    """Run one echoscu process (association, C-ECHO, release); as :func:`findscu`."""
    cmd = [
        "echoscu", "-aet", CALLING_AET, "-aec", server.aet, "-to", str(int(timeout)),
        "127.0.0.1", str(server.dicom_port),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(
        cmd,
        env={**os.environ, **NODELAY_ENV},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    seconds = time.perf_counter() - started
    error = "" if proc.returncode == 0 else f"echoscu exit {proc.returncode}: {proc.stderr[:200]}"
    return seconds, 0, set(), error


def whole_process(server: Server, kind: QueryKind) -> tuple[float, int, set[str], str]:
    """The DCMTK process of `kind`: echoscu, findscu -W or a study-level findscu."""
    if kind.label == ECHO_LABEL:
        return echoscu(server)
    return findscu(server, kind.params, worklist=kind.label == WORKLIST_LABEL)


class PynetdicomClient:
    """One Study Root C-FIND association kept open, Nagle off."""

    def __init__(self, server: Server) -> None:
        import logging

        from pynetdicom import AE, _config
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        _config.LOG_HANDLER_LEVEL = "none"
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=CALLING_AET)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.dimse_timeout = 900
        ae.acse_timeout = 60
        self.model = StudyRootQueryRetrieveInformationModelFind
        self.assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
        if not self.assoc.is_established:
            raise RuntimeError(f"cannot associate with {server.label}")
        sock = self.assoc.dul.socket.socket if self.assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def find(self, params: dict[str, str]) -> tuple[float, int, set[str], str]:
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for keyword in RETURN_KEYS:
            setattr(ds, keyword, params.get(keyword, ""))
        count, uids, error = 0, set(), ""
        started = time.perf_counter()
        for status, identifier in self.assoc.send_c_find(ds, self.model):
            code = int(status.Status) if status and "Status" in status else -1
            if code in (0xFF00, 0xFF01):
                count += 1
                if identifier is not None and "StudyInstanceUID" in identifier:
                    uids.add(str(identifier.StudyInstanceUID))
            elif code != 0:
                error = f"C-FIND status 0x{code:04X}" if code >= 0 else "no response"
        seconds = time.perf_counter() - started
        return seconds, count, uids, error

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


# --------------------------------------------------------------------------- measuring


def record(side: Side, outcome: tuple[float, int, set[str], str], timed: bool) -> None:
    seconds, count, uids, error = outcome
    if error:
        side.errors.append(error)
        return
    if side.count is not None and side.count != count:
        side.errors.append(f"answer changed: {side.count} then {count} studies")
    side.count = count
    if side.uids is None:
        side.uids = uids
    if timed:
        side.times_ms.append(seconds * 1e3)


def warm_up_receiver(
    server: ReceiverServer, kind: QueryKind, facts: dict[str, float | str]
) -> None:
    """C-FIND until every worker has loaded its catalog: 8 fast answers in a row."""
    started = time.monotonic()
    first: float | None = None
    fast = 0
    best = float("inf")
    attempts = 0
    while fast < 8:
        attempts += 1
        seconds, count, _uids, error = findscu(server, kind.params)
        if error or count == 0:
            raise RuntimeError(
                f"warm-up C-FIND failed ({count} answers): {error}\n{server.log_tail()}"
            )
        if first is None:
            first = seconds
            log(f"  first answer after {seconds:.1f} s (catalog load in one worker)")
        best = min(best, seconds)
        fast = fast + 1 if seconds < max(1.0, 3 * best) else 0
        if attempts > 200:
            raise RuntimeError("warm-up did not settle after 200 C-FINDs")
    facts["ours_first_cfind_s"] = first or 0.0
    facts["ours_warmup_s"] = time.monotonic() - started
    facts["ours_warmup_cfinds"] = attempts
    log(f"  warm: {attempts} C-FINDs in {facts['ours_warmup_s']:.1f} s")


def measure(size: SizeResult, servers: dict[str, Server], args: argparse.Namespace) -> None:
    targets = list(servers)
    for client_name in size.clients:
        clients: dict[str, PynetdicomClient] = {}
        try:
            if client_name == "pynetdicom":
                clients = {t: PynetdicomClient(servers[t]) for t in targets}
            for kind in size.kinds:
                sides = {
                    t: size.results.setdefault((client_name, t, kind.label), Side())
                    for t in targets
                }
                for i in range(args.warmup + args.requests):
                    order = targets if i % 2 == 0 else targets[::-1]
                    for target in order:
                        if client_name == "findscu":
                            outcome = whole_process(servers[target], kind)
                        else:
                            outcome = clients[target].find(kind.params)
                        record(sides[target], outcome, timed=i >= args.warmup)
                summary = ", ".join(
                    f"{t} p50 {sides[t].p(0.5):.1f} ms ({sides[t].count} studies)" for t in targets
                )
                log(f"  {client_name} {kind.label}: {summary}; plan says {kind.expected}")
        finally:
            for client in clients.values():
                client.close()


def write_worklist(folder: Path) -> None:
    """The worklist items of WORKLIST_STEPS as ``.wl`` files (as DCMTK's wlmscpfs and
    Orthanc's plugin read them)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    for i, (modality, accession) in enumerate(WORKLIST_STEPS, start=1):
        step = Dataset()
        step.Modality = modality
        step.ScheduledStationAETitle = f"{modality}SCANNER1"
        step.ScheduledProcedureStepStartDate = WORKLIST_DATE
        step.ScheduledProcedureStepStartTime = f"{8 + i:02d}0000"
        step.ScheduledProcedureStepID = f"SPS{i}"
        step.ScheduledProcedureStepDescription = f"{modality} BENCH"
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = f"BENCH^WORKLIST{i}"
        ds.PatientID = f"WLPAT{i}"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.AccessionNumber = accession
        ds.StudyInstanceUID = generate_uid()
        ds.RequestedProcedureID = f"RP{i}"
        ds.RequestedProcedureDescription = f"{modality} BENCH"
        ds.ScheduledProcedureStepSequence = [step]
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.276.0.7230010.3.1.0.1"  # DCMTK's worklist
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"step{i}.wl", enforce_file_format=True)


def ensure_worklist(root: Path, data_dir: Path) -> Path:
    """The worklist folder (for Orthanc) under the cache `root`, imported into our
    `data_dir` once (``vannah worklist import``)."""
    folder = root / "worklist"
    marker = root / ".worklist-complete"
    if marker.exists():
        return folder
    write_worklist(folder)
    niced(
        [
            sys.executable, "-m", "vannah_pipelines.cli", "--data-dir", str(data_dir),
            "worklist", "import", str(folder),
        ]
    )  # fmt: skip
    marker.touch()
    return folder


def run_size(instances: int, args: argparse.Namespace) -> SizeResult:
    with_orthanc = instances <= args.orthanc_max and not args.ours_only
    plan = plan_archive(instances, args.per_study, args.seed)
    size = SizeResult(instances, with_orthanc, len(plan), query_kinds(plan))
    data_dir, orthanc_dir = prepare_archive(instances, len(plan), with_orthanc, args, size.facts)
    orthanc_config = dict(ORTHANC_QR)
    if args.small:
        size.clients = ("findscu",)
        expected = sum(1 for modality, _ in WORKLIST_STEPS if modality == "CT")
        size.kinds += [QueryKind(WORKLIST_LABEL, {}, expected), QueryKind(ECHO_LABEL, {}, 0)]
        worklist = ensure_worklist(data_dir.parent, data_dir)
        orthanc_config |= {
            "DicomAlwaysAllowFindWorklist": True,
            "Plugins": [WORKLIST_PLUGIN],
            "Worklists": {"Enable": True, "Database": str(worklist)},
        }

    servers: dict[str, Server] = {}
    with run_dir(f"cfind-{instances}") as workdir:
        try:
            log("starting our receiver (loads the catalog on the first C-FIND per worker)")
            ours = ReceiverServer(
                workdir / "vannah",
                extra_env={"VANNAH_DATA_DIR": str(data_dir), **dict(args.receiver_env)},
            )
            servers["vannah"] = ours
            ours.start()
            assert ours.memory is not None
            warm_up_receiver(ours, size.kinds[0], size.facts)
            size.facts["ours_rss_after_load"] = ours.memory.sample()
            if orthanc_dir is not None:
                log("starting Orthanc on the cached storage")
                orthanc = OrthancServer(orthanc_dir, extra_config=orthanc_config)
                servers["orthanc"] = orthanc
                orthanc.start()
            measure(size, servers, args)
            size.facts["ours_peak_rss"] = ours.memory.peak_bytes
            if "orthanc" in servers:
                memory = servers["orthanc"].memory
                assert memory is not None
                size.facts["orthanc_peak_rss"] = memory.peak_bytes
        finally:
            with signals_deferred():
                for server in servers.values():
                    server.stop()
    return size


# --------------------------------------------------------------------------- report


def report(sizes: list[SizeResult], args: argparse.Namespace) -> list[str]:
    """Print the tables; return the problems found (errors, count or UID mismatches)."""
    header = [
        "catalog",
        "client",
        "query",
        "studies ours / Orthanc / plan",
        *LATENCY_HEADER,
    ]
    rows: list[list[str]] = []
    for size in sizes:
        for client in size.clients:
            for kind in size.kinds:
                ours = size.results[(client, "vannah", kind.label)]
                ref = size.results.get((client, "orthanc", kind.label))
                row = [
                    f"{size.instances:,} inst." + ("" if size.with_orthanc else " (ours only)"),
                    client,
                    kind.label,
                    f"{ours.count} / {ref.count if ref else '-'} / {kind.expected}",
                ]
                row += latency_cells(ours, ref)
                rows.append(row)
    print_table(
        f"C-FIND study level latency, {args.requests} queries per query kind and client after "
        f"{args.warmup} warm-up, interleaved ours/Orthanc. findscu: the whole DCMTK process "
        "per query; pynetdicom: one association reused, C-FIND request to final response",
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
                f"{float(f.get('ours_first_cfind_s', 0)):.1f} s",
                f"{int(f.get('ours_warmup_cfinds', 0))} in "
                f"{float(f.get('ours_warmup_s', 0)):.1f} s",
                mib(f.get("ours_rss_after_load")),
                mib(f.get("ours_peak_rss")),
                mib(f.get("orthanc_peak_rss")) if size.with_orthanc else "not run",
            ]
        )
    print_table(
        "Servers: our receiver's catalog load (first C-FIND) and memory (RSS of the process "
        "tree: supervisor + workers, each worker holds its own catalog)",
        [
            "catalog",
            "our catalog built by",
            "first C-FIND (load)",
            "warm-up C-FINDs",
            "our RSS after load",
            "our peak RSS",
            "Orthanc peak RSS",
        ],
        rows,
    )
    if any(not s.with_orthanc for s in sizes):
        without = ", ".join(f"{s.instances:,}" for s in sizes if not s.with_orthanc)
        print(
            "\nOrthanc is measured at "
            f"{max((s.instances for s in sizes if s.with_orthanc), default=0):,} instances "
            f"only: it was not loaded at {without} because loading it by C-STORE takes too "
            "long (~540 inst/s: 1,000,000 is 30+ minutes, and its SQLite index slows as it "
            "grows)."
        )
    problems: list[str] = []
    for s in sizes:
        for (client, target, kind), side in s.results.items():
            problems += [
                f"{s.instances:,} / {client} / {target} / {kind}: {e}" for e in side.errors[:3]
            ]
        if not s.with_orthanc:
            continue
        for client in s.clients:
            for k in s.kinds:
                ours = s.results[(client, "vannah", k.label)]
                ref = s.results[(client, "orthanc", k.label)]
                if ours.count != ref.count:
                    problems.append(
                        f"count mismatch {s.instances:,} / {client} / {k.label}: "
                        f"ours {ours.count}, Orthanc {ref.count}"
                    )
                elif ours.uids != ref.uids:
                    problems.append(
                        f"StudyInstanceUID sets differ {s.instances:,} / {client} / {k.label}"
                    )
    if problems:
        print("\n**Problems:**\n")
        for problem in problems:
            print(f"- {problem}")
    else:
        print(
            "\nAt every size with Orthanc, both sides returned the same number of studies and "
            "the same StudyInstanceUIDs for every query and client."
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="archive sizes"
    )
    parser.add_argument(
        "--orthanc-max", type=int, default=100_000, help="largest size Orthanc is measured at"
    )
    parser.add_argument("--ours-only", action="store_true", help="skip Orthanc at every size")
    parser.add_argument("--requests", type=int, default=30, help="timed queries per kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed queries per kind")
    parser.add_argument("--per-study", type=int, default=100, help="instances per study")
    parser.add_argument(
        "--files", type=int, default=100, help="Parquet files of a directly written catalog"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--receiver-env",
        action="append",
        default=[],
        type=lambda s: tuple(s.split("=", 1)),
        metavar="NAME=VALUE",
        help="extra VANNAH_* setting for our receiver (repeatable)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2,000 (both) + 20,000 (ours), 5 queries"
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"{SMALL_SIZE:,} instances (both), whole findscu processes only, plus an MWL "
        "query and a C-ECHO",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.small:
        args.sizes, args.orthanc_max = [SMALL_SIZE], SMALL_SIZE
    if args.quick:
        args.sizes, args.orthanc_max, args.requests, args.warmup = [2000, 20_000], 2000, 5, 1
    install_signal_handlers()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sizes: list[SizeResult] = []
    try:
        for instances in args.sizes:
            sizes.append(run_size(instances, args))
    except KeyboardInterrupt:
        log("interrupted: servers stopped")
        return 130
    problems = report(sizes, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "requests": args.requests,
            "warmup": args.warmup,
            "return_keys": list(RETURN_KEYS),
            "problems": problems,
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
                                f"{client}/{target}": side.as_dict()
                                for (client, target, label), side in s.results.items()
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
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
