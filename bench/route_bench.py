"""Routing to a DCMTK storescp (issue 11): ours (the whole platform, `vannah up`) and
Orthanc (Lua `OnStoredInstance` -> `SendToModality`) side by side in one run.

Each side gets a fresh storage, its own `storescp -aet AI_ENGINE +B -od DIR PORT` as the
"AI engine", and the same synthetic CT set, sent by this script over one association
(pynetdicom, each C-STORE acknowledgement timed per SOP Instance UID). A watcher polls the
storescp folder every 50 ms and records when each instance's file first appears. At the end
every instance must have arrived, with the same data set bytes (after the file meta group)
as the file sent.

- instance mode: ours with the rule `{"modality": "CT"} -> AI_ENGINE` (each instance once
  indexed); Orthanc with `OnStoredInstance(...) SendToModality(instanceId, 'ai')`.
  Throughput = instances (MB) / (first acknowledgement -> last arrival); latency per instance
  = arrival - its acknowledgement.
- study mode: the same rule with `"mode": "study", "stableAge": S`; Orthanc with
  `StableAge: S` and `OnStableStudy(...) SendToModality(studyId, 'ai')`; `--studies` studies
  of `--study-size` instances sent back to back; latency per study = its last instance's
  arrival - its last acknowledgement.

For ours the script also reads where the time went from the catalog (received_at,
indexed_at; the delivery log's queued_at and sent time) and Dagster's run storage (run
creation, start and end of the ingest and routing runs).

    .venv/bin/python bench/route_bench.py                # 1,000 CT x 2 repeats + 5 studies of 50
    .venv/bin/python bench/route_bench.py --quick        # 100 CT x 1 repeat + 2 studies of 20
    .venv/bin/python bench/route_bench.py --only vannah --skip-study --json bench/out/route.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    DATA_DIR,
    NODELAY_ENV,
    REPO_ROOT,
    DataSet,
    OrthancServer,
    Series,
    Server,
    _process_tree,
    format_ratio,
    free_port,
    install_signal_handlers,
    kill_group,
    log,
    print_table,
    quantile,
    run_dir,
    signals_deferred,
    synthetic_set,
    wait_for_port,
)

DEST_AET = "AI_ENGINE"
RULE_NAME = "Route CT to AI Pipeline"
CALLING_AET = "ROUTEBENCH"
POLL_SECONDS = 0.05


# --------------------------------------------------------------------------- data


def study_sets(studies: int, size: int) -> list[DataSet]:
    """`studies` one-study sets of `size` CT instances each (distinct Study UIDs), cached."""
    from pydicom.uid import generate_uid

    from vannah_pipelines.dicom.synthetic import make_instance, to_part10

    out = []
    for s in range(studies):
        name = f"route-study-{size}-{s}"
        folder = DATA_DIR / name
        files_dir = folder / "files"
        if not (folder / ".complete").exists():
            files_dir.mkdir(parents=True, exist_ok=True)
            study_uid, series_uid = generate_uid(), generate_uid()
            for i in range(size):
                ds = make_instance(
                    "CT",
                    study_uid=study_uid,
                    series_uid=series_uid,
                    patient_id=f"VHC-ROUTE-{s}",
                    patient_name="Bench^Route",
                    series_number=1,
                    instance_number=i + 1,
                )
                (files_dir / f"{i:07d}.dcm").write_bytes(to_part10(ds))
            (folder / ".complete").touch()
        out.append(DataSet(name, folder, tuple(sorted(files_dir.iterdir()))))
    return out


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part-10 file: everything after the file meta group (0002)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path}: not a Part-10 file"
    # (0002,0000) UL, explicit VR: tag 4 + VR 2 + length 2 + value 4.
    group_len = int.from_bytes(raw[132 + 8 : 132 + 12], "little")
    return raw[132 + 12 + group_len :]


def sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --------------------------------------------------------------------------- destination


class StoreScp:
    """`storescp -aet AI_ENGINE +B -od DIR PORT` (TCP_NODELAY=1) and a 50 ms folder watcher."""

    def __init__(self, workdir: Path) -> None:
        self.folder = workdir / "received"
        self.folder.mkdir(parents=True)
        self.log_path = workdir / "storescp.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.arrived: dict[str, float] = {}  # SOP Instance UID -> epoch first seen
        self.files: dict[str, Path] = {}
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> StoreScp:
        with self.log_path.open("wb") as logf:
            self.proc = subprocess.Popen(
                ["storescp", "-aet", DEST_AET, "+B", "-od", str(self.folder), str(self.port)],
                env={**os.environ, **NODELAY_ENV},
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, self.proc)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(POLL_SECONDS)

    def scan(self) -> None:
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.folder):
                name = entry.name
                if name in self._seen or name.startswith("."):
                    continue
                self._seen.add(name)
                # storescp's default name: "<modality prefix>.<SOP Instance UID>"
                uid = name.split(".", 1)[1] if "." in name else name
                uid = uid.removesuffix(".dcm")
                if uid not in self.arrived:
                    self.arrived[uid] = now
                    self.files[uid] = Path(entry.path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.proc is not None:
            kill_group(self.proc, timeout=5)


# --------------------------------------------------------------------------- ours


class VannahPlatform(Server):
    """`vannah up` on a fresh data folder with the routing rules file: receiver, DICOMweb,
    MLLP, Dagster webserver and daemon (sensors), as a user runs it."""

    label = "vannah"
    aet = "VANNAHCLOUD"

    def __init__(self, workdir: Path, rules: dict[str, Any]) -> None:
        super().__init__(workdir)
        self.rules = rules
        self.ready_seconds = 0.0

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def _command(self) -> list[str]:
        self.dicom_port = free_port()
        rules_file = self.workdir / "rules.json"
        rules_file.write_text(json.dumps(self.rules, indent=2))
        self._rules_file = rules_file
        return [str(Path(sys.executable).parent / "vannah"), "up"]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VANNAH_")}
        env.update(NODELAY_ENV)
        env.update(
            VANNAH_DATA_DIR=str(self.data_dir),
            VANNAH_DICOM_PORT=str(self.dicom_port),
            VANNAH_DICOM_AET=self.aet,
            VANNAH_DICOMWEB_PORT=str(free_port()),
            VANNAH_DAGSTER_PORT=str(free_port()),
            VANNAH_WORKLIST_MLLP_PORT=str(free_port()),
            VANNAH_VIEWER_ENABLED="false",
            VANNAH_ROUTING_RULES_FILE=str(self._rules_file),
        )
        return env

    def _wait_ready(self) -> None:
        assert self.proc is not None
        started = time.monotonic()
        # The receiver starts only once the code location loaded and the landing sensor ticks.
        wait_for_port(self.dicom_port, self.proc, timeout=300)
        self.ready_seconds = time.monotonic() - started

    def stop(self) -> None:
        with signals_deferred():
            # `vannah up` starts each service in its own session: remember them all, ask the
            # supervisor to stop them (SIGTERM), then kill any survivor by its pid.
            tree = _process_tree(self.proc.pid) if self.proc is not None else []
            if self.memory is not None:
                self.memory.stop()
            if self.proc is not None:
                kill_group(self.proc, timeout=60)
            for pid in tree:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, 9)
            if self._log is not None:
                self._log.close()
                self._log = None

    def stored_instances(self) -> int:
        return 0

    def breakdown(self, acks: dict[str, float], arrivals: dict[str, float]) -> dict[str, Any]:
        """Where the time went, per instance (seconds, medians and p95): ack -> indexed
        (ingest), indexed -> delivery queued (routing sensor), queued -> sent (routing run),
        sent -> arrival; and the Dagster runs (count, create -> start, start -> end)."""
        out: dict[str, Any] = {"runs": self._runs()}  # first: waits for the last run to end
        try:
            from vannah_pipelines.catalog.reader import CatalogReader

            reader = CatalogReader(self.data_dir / "catalog")
            reader.refresh()
            rows = reader.query(
                "SELECT i.sop_instance_uid, epoch(i.received_at), epoch(i.indexed_at), "
                "epoch(d.queued_at), epoch(d.changed_at), d.status, d.attempts "
                "FROM instances i LEFT JOIN delivery_status d USING (sop_instance_uid)"
            )
            reader.close()
        except Exception as exc:  # a breakdown must not lose the figures
            return {"error": f"catalog: {type(exc).__name__}: {exc}"}
        steps: dict[str, list[float]] = {
            "ack_to_indexed": [],
            "indexed_to_queued": [],
            "queued_to_sent": [],
            "sent_to_arrival": [],
        }
        statuses: dict[str, int] = {}
        for uid, _received, indexed, queued, changed, status, _attempts in rows:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if uid not in acks or indexed is None:
                continue
            steps["ack_to_indexed"].append(indexed - acks[uid])
            if queued is not None:
                steps["indexed_to_queued"].append(queued - indexed)
                if status == "sent" and changed is not None:
                    steps["queued_to_sent"].append(changed - queued)
                    if uid in arrivals:
                        steps["sent_to_arrival"].append(arrivals[uid] - changed)
        out["delivery_status"] = statuses
        out["steps"] = {
            k: {"p50": statistics.median(v), "p95": quantile(v, 0.95), "n": len(v)}
            for k, v in steps.items()
            if v
        }
        return out

    def _runs(self, wait: float = 60.0) -> dict[str, Any]:
        """Dagster's runs, once none is under way (the last routing run records its
        outcome after the last instance arrived), waiting at most `wait` seconds."""
        db = self.data_dir / "dagster" / "history" / "runs.db"
        if not db.exists():
            return {"error": f"{db} missing"}
        deadline = time.monotonic() + wait
        while True:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                rows = conn.execute(
                    "SELECT pipeline_name, status, create_timestamp, start_time, end_time FROM runs"
                ).fetchall()
            busy = [r for r in rows if r[1] in ("NOT_STARTED", "QUEUED", "STARTING", "STARTED")]
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(1)
        jobs: dict[str, dict[str, Any]] = {}
        for job, status, created, start, end in rows:
            j = jobs.setdefault(job, {"runs": 0, "status": {}, "queue_s": [], "run_s": []})
            j["runs"] += 1
            j["status"][status] = j["status"].get(status, 0) + 1
            if created and start:
                # create_timestamp is a naive UTC datetime string; start/end are epochs.
                from datetime import UTC, datetime

                c = datetime.fromisoformat(str(created)).replace(tzinfo=UTC).timestamp()
                j["queue_s"].append(start - c)
            if start and end:
                j["run_s"].append(end - start)
        for j in jobs.values():
            for key in ("queue_s", "run_s"):
                v = j.pop(key)
                j[key] = {"p50": statistics.median(v), "max": max(v), "sum": sum(v)} if v else None
        return jobs


# --------------------------------------------------------------------------- sending


def send(files: list[Path], port: int, called_aet: str) -> dict[str, float]:
    """C-STORE `files` over one association; SOP Instance UID -> epoch of its ack."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        raise RuntimeError(f"association to {called_aet}@{port} refused")
    acks: dict[str, float] = {}
    try:
        for path in files:
            status = assoc.send_c_store(path)  # read and sent as stored, not re-encoded
            when = time.time()
            if not status or status.Status != 0:
                raise RuntimeError(f"C-STORE {path.name}: {status}")
            acks[UIDS[path]] = when
    finally:
        assoc.release()
    return acks


UIDS: dict[Path, str] = {}


# --------------------------------------------------------------------------- one side


@dataclass
class Outcome:
    target: str
    mode: str
    acks: dict[str, float] = field(default_factory=dict)
    arrivals: dict[str, float] = field(default_factory=dict)
    total_bytes: int = 0
    mismatched: list[str] = field(default_factory=list)
    ready_seconds: float = 0.0
    breakdown: dict[str, Any] | None = None
    error: str | None = None

    @property
    def missing(self) -> int:
        return len(set(self.acks) - set(self.arrivals))

    def latencies(self) -> list[float]:
        return [self.arrivals[u] - t for u, t in self.acks.items() if u in self.arrivals]

    def span(self) -> float:
        if not self.acks or not self.arrivals:
            return float("nan")
        return max(self.arrivals.values()) - min(self.acks.values())

    def as_dict(self) -> dict[str, Any]:
        lat = self.latencies()
        d: dict[str, Any] = {
            "target": self.target,
            "mode": self.mode,
            "sent": len(self.acks),
            "arrived": len(self.arrivals),
            "missing": self.missing,
            "mismatched": len(self.mismatched),
            "total_bytes": self.total_bytes,
            "span_s": self.span(),
            "ready_s": self.ready_seconds,
            "error": self.error,
        }
        if lat and self.mode == "instance" and not self.missing:
            d["instances_per_s"] = len(self.acks) / self.span()
            d["mb_per_s"] = self.total_bytes / 1e6 / self.span()
        if lat:
            d["latency_s"] = {
                "p50": statistics.median(lat),
                "p95": quantile(lat, 0.95),
                "min": min(lat),
                "max": max(lat),
            }
        if self.breakdown is not None:
            d["breakdown"] = self.breakdown
        return d


def rules_for(mode: str, port: int, stable_age: int) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": RULE_NAME,
        "condition": {"modality": "CT"},
        "destination": {"aet": DEST_AET, "host": "127.0.0.1", "port": port},
    }
    if mode == "study":
        rule.update(mode="study", stableAge=stable_age)
    return {"rules": [rule]}


LUA = {
    "instance": "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
    "  SendToModality(instanceId, 'ai')\nend\n",
    # Orthanc 1.10.1's Lua SendToModality takes instances only: given the study ID from
    # OnStableStudy it logs "Unable to read attachment dicom of instance <study id>" and sends
    # nothing. The REST call its book uses for whole resources does it (a C-STORE job).
    "study": "function OnStableStudy(studyId, tags, metadata)\n"
    "  RestApiPost('/modalities/ai/store', studyId)\nend\n",
}


def run_side(
    target: str, mode: str, files: list[Path], root: Path, *, stable_age: int, timeout: float
) -> Outcome:
    outcome = Outcome(target, mode, total_bytes=sum(p.stat().st_size for p in files))
    workdir = root / f"{target}-{mode}"
    workdir.mkdir()
    (workdir / "scp").mkdir()
    scp = StoreScp(workdir / "scp").start()
    server: Server
    if target == "vannah":
        server = VannahPlatform(workdir / "server", rules_for(mode, scp.port, stable_age))
    else:
        lua = workdir / "route.lua"
        lua.write_text(LUA[mode])
        server = OrthancServer(
            workdir / "server",
            extra_config={
                "LuaScripts": [str(lua)],
                "DicomModalities": {"ai": [DEST_AET, "127.0.0.1", scp.port]},
                "StableAge": stable_age,
            },
        )
    try:
        started = time.monotonic()
        server.start()
        outcome.ready_seconds = getattr(server, "ready_seconds", 0.0) or (
            time.monotonic() - started
        )
        log(f"  {target}/{mode}: up in {outcome.ready_seconds:.1f} s; sending {len(files)}")
        outcome.acks = send(files, server.dicom_port, server.aet)
        sent_at = time.monotonic()
        log(f"  {target}/{mode}: sent in {time.time() - min(outcome.acks.values()):.1f} s")
        deadline = sent_at + timeout
        last_report = sent_at
        while time.monotonic() < deadline and not set(outcome.acks) <= set(scp.arrived):
            time.sleep(0.2)
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                log(f"    {len(scp.arrived)}/{len(files)} arrived")
        time.sleep(2 * POLL_SECONDS)
        scp.scan()
        outcome.arrivals = {u: t for u, t in scp.arrived.items() if u in outcome.acks}
        if outcome.missing:
            outcome.error = f"{outcome.missing} of {len(files)} never arrived in {timeout:.0f} s"
            log(f"  {target}/{mode}: {outcome.error}")
        if isinstance(server, VannahPlatform):
            outcome.breakdown = server.breakdown(outcome.acks, outcome.arrivals)
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        log(f"  {target}/{mode} failed: {outcome.error}\n{server.log_tail()}")
    finally:
        server.stop()
        scp.stop()
    # Same data set bytes as sent (after the file meta group, which each sender writes).
    by_uid = {UIDS[p]: p for p in files}
    for uid, path in scp.files.items():
        if uid in by_uid:
            try:
                same = dataset_bytes(path) == dataset_bytes(by_uid[uid])
            except (OSError, AssertionError):
                same = False
            if not same:
                outcome.mismatched.append(uid)
    if outcome.mismatched:
        log(f"  {target}/{mode}: {len(outcome.mismatched)} data sets differ from what was sent")
    return outcome


def study_latencies(outcome: Outcome, studies: list[DataSet]) -> list[float]:
    """Per study: its last instance's arrival - its last acknowledgement (complete studies)."""
    out = []
    for ds in studies:
        uids = [UIDS[p] for p in ds.files]
        if all(u in outcome.arrivals for u in uids) and all(u in outcome.acks for u in uids):
            out.append(max(outcome.arrivals[u] for u in uids) - max(outcome.acks[u] for u in uids))
    return out


# --------------------------------------------------------------------------- report


def s(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--study-size", type=int, default=50)
    parser.add_argument("--study-repeats", type=int, default=1)
    parser.add_argument("--stable-age", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=0, help="per side, after the send")
    parser.add_argument("--quick", action="store_true", help="100 CT x 1, 2 studies of 20")
    parser.add_argument("--only", choices=["vannah", "orthanc"])
    parser.add_argument("--skip-study", action="store_true")
    parser.add_argument("--skip-instance", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.instances, args.repeats, args.studies, args.study_size = 100, 1, 2, 20
    install_signal_handlers()
    targets = [args.only] if args.only else ["vannah", "orthanc"]
    data = synthetic_set(args.instances, "ct")
    files = list(data.files)
    studies = study_sets(args.studies, args.study_size)
    study_files = [p for ds in studies for p in ds.files]
    for p in files + study_files:
        UIDS[p] = sop_uid(p)
    timeout = args.timeout or max(300.0, args.instances * 0.6)
    results: dict[str, list[Outcome]] = {"instance": [], "study": []}
    with run_dir("route") as root:
        for rep in range(args.repeats if not args.skip_instance else 0):
            order = targets if rep % 2 == 0 else targets[::-1]
            for target in order:
                log(f"repeat {rep + 1}/{args.repeats}: {target}, instance mode")
                sub = root / f"r{rep}"
                sub.mkdir(exist_ok=True)
                results["instance"].append(
                    run_side(target, "instance", files, sub, stable_age=args.stable_age,
                             timeout=timeout)
                )  # fmt: skip
        for rep in range(args.study_repeats if not args.skip_study else 0):
            order = targets if rep % 2 == 0 else targets[::-1]
            for target in order:
                log(f"study repeat {rep + 1}/{args.study_repeats}: {target}, study mode")
                sub = root / f"s{rep}"
                sub.mkdir(exist_ok=True)
                results["study"].append(
                    run_side(target, "study", study_files, sub, stable_age=args.stable_age,
                             timeout=args.stable_age + 180)
                )  # fmt: skip

    # instance mode table
    rows = []
    series: dict[str, dict[str, Series]] = {}
    for target in targets:
        outs = [o for o in results["instance"] if o.target == target]
        f = series.setdefault(target, {k: Series() for k in ("ips", "mbs", "p50", "p95")})
        lat_all: list[float] = []
        for o in outs:
            d = o.as_dict()
            if "instances_per_s" in d:
                f["ips"].add(d["instances_per_s"])
                f["mbs"].add(d["mb_per_s"])
            if "latency_s" in d:
                f["p50"].add(d["latency_s"]["p50"])
                f["p95"].add(d["latency_s"]["p95"])
            lat_all += o.latencies()
        arrived = sum(len(o.arrivals) for o in outs)
        sent = sum(len(o.acks) for o in outs) or args.instances * len(outs)
        bad = sum(len(o.mismatched) for o in outs)
        rows.append(
            [
                {"vannah": "Vannah (vannah up)", "orthanc": "Orthanc + Lua"}[target],
                f"{arrived}/{sent}" + (f", {bad} differ" if bad else ""),
                f["ips"].summary(".1f"),
                f["mbs"].summary(".1f"),
                f["p50"].summary(".2f"),
                f["p95"].summary(".2f"),
                f"{s(min(lat_all))}-{s(max(lat_all))}" if lat_all else "-",
            ]
        )
    if len(targets) == 2 and all(series[t]["ips"].values for t in targets):
        v, o = series["vannah"], series["orthanc"]
        rows.append(
            [
                "ours / Orthanc",
                "",
                format_ratio(v["ips"].median, o["ips"].median),
                format_ratio(v["mbs"].median, o["mbs"].median),
                format_ratio(v["p50"].median, o["p50"].median),
                format_ratio(v["p95"].median, o["p95"].median),
                "",
            ]
        )
    if results["instance"]:
        print_table(
            f"Routing {args.instances} CT ({data.total_bytes / 1e6:.0f} MB) to storescp, "
            f"one association in, {args.repeats} repeat(s), median (min-max)",
            ["system", "arrived", "inst/s", "MB/s", "latency p50 s", "latency p95 s",
             "latency min-max s"],
            rows,
        )  # fmt: skip
        bd_rows = []
        for o in results["instance"]:
            if o.target != "vannah" or not o.breakdown:
                continue
            steps = o.breakdown.get("steps", {})
            runs = o.breakdown.get("runs", {})
            cells = [
                f"{s(steps[k]['p50'])} / {s(steps[k]['p95'])}" if k in steps else "-"
                for k in ("ack_to_indexed", "indexed_to_queued", "queued_to_sent",
                          "sent_to_arrival")
            ]  # fmt: skip
            run_cells = []
            for job in ("ingest_batch_job", "route_instances_job"):
                j = next((v for k, v in runs.items() if isinstance(v, dict) and k == job), None)
                if j is None:
                    j = next(
                        (v for k, v in runs.items() if isinstance(v, dict) and job.split("_")[0]
                         in k), None,
                    )  # fmt: skip
                if j and j.get("run_s"):
                    run_cells.append(
                        f"{j['runs']} runs, queue p50 {s(j['queue_s']['p50'])} s, "
                        f"run p50 {s(j['run_s']['p50'])} s (max {s(j['run_s']['max'])})"
                    )
                else:
                    run_cells.append("-")
            bd_rows.append([*cells, *run_cells])
        if bd_rows:
            print_table(
                "Ours: where the time went per instance, p50 / p95 s (catalog and delivery log)",
                ["ack -> indexed", "indexed -> queued", "queued -> sent", "sent -> arrival",
                 "ingest runs", "routing runs"],
                bd_rows,
            )  # fmt: skip

    # study mode table
    if results["study"]:
        rows = []
        p95s: dict[str, float] = {}
        for target in targets:
            outs = [o for o in results["study"] if o.target == target]
            lat = [x for o in outs for x in study_latencies(o, studies)]
            n = len(studies) * len(outs)
            bad = sum(len(o.mismatched) for o in outs)
            if lat:
                p95s[target] = quantile(lat, 0.95)
            rows.append(
                [
                    {"vannah": "Vannah (vannah up)", "orthanc": "Orthanc + Lua"}[target],
                    f"{len(lat)}/{n}" + (f", {bad} instances differ" if bad else ""),
                    s(statistics.median(lat)) if lat else "-",
                    s(quantile(lat, 0.95)) if lat else "-",
                    f"{s(min(lat))}-{s(max(lat))}" if lat else "-",
                ]
            )
        if len(p95s) == 2:
            rows.append(["ours / Orthanc", "", "", format_ratio(p95s["vannah"],
                         p95s["orthanc"]), ""])  # fmt: skip
        print_table(
            f"Stable-study routing: {args.studies} studies of {args.study_size} CT sent back "
            f"to back, stableAge / StableAge {args.stable_age} s; study's last ack -> its last "
            "instance at storescp",
            ["system", "studies complete", "p50 s", "p95 s", "min-max s"],
            rows,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "instance": [o.as_dict() for o in results["instance"]],
                    "study": [
                        {**o.as_dict(), "study_latency_s": study_latencies(o, studies)}
                        for o in results["study"]
                    ],
                },
                indent=2,
            )
        )
    failed = any(o.error or o.mismatched for v in results.values() for o in v)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
