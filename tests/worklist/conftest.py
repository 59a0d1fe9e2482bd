"""Fixtures for the worklist tests: a store in tmp, an in-process MWL SCP, DCMTK peers."""

from __future__ import annotations

import functools
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.receiver.receiver_support import ReceiverProcess
from tests.servers import free_port
from vannah_pipelines.worklist.store import WorklistStore

DCMTK_EXAMPLES = Path("/usr/share/doc/dcmtk/examples")
WLISTDB = DCMTK_EXAMPLES / "wlistdb" / "OFFIS"
WLISTQRY = DCMTK_EXAMPLES / "wlistqry"

# DCMTK is installed by .ci/bootstrap (make test): its absence is a failure, not a skip.
needs_dcmtk = pytest.mark.integration


@pytest.fixture
def store(tmp_path: Path) -> WorklistStore:
    return WorklistStore(tmp_path / "data" / "catalog" / "worklist")


@pytest.fixture(scope="session")
def mwl_receivers() -> Iterator[Callable[..., int]]:
    """Factory: the real receiver (``python -m receiver``) serving the data folder that holds
    `store` (``<data>/catalog/worklist``) with C-FIND on the DIMSE path `path`; returns its
    port. One receiver per data folder, past-due setting and path, shared by the tests of a
    session."""
    running: dict[tuple[Path, float, str], ReceiverProcess] = {}

    def start(store: WorklistStore, past_due_hours: float = 24.0, *, path: str = "fast") -> int:
        data_dir = store.root.parent.parent
        assert store.root == data_dir / "catalog" / "worklist", store.root
        key = (data_dir, past_due_hours, path)
        if key not in running:
            env = {"VANNAH_WORKLIST_PAST_DUE_HOURS": str(past_due_hours)}
            if path == "pynetdicom":
                env["VANNAH_RECEIVER_FAST_STORE"] = "false"
            running[key] = ReceiverProcess(
                data_dir=data_dir,
                port=0,
                workers=1,
                env=env,
                runs=100 * len(running),  # port and log files apart from the others'
            ).start()
        return running[key].port

    yield start
    live = [rx for rx in running.values() if rx.proc is not None and rx.proc.poll() is None]
    for rx in live:  # all at once: each takes a few seconds to drain and seal
        assert rx.proc is not None
        rx.proc.send_signal(signal.SIGTERM)
    for rx in live:
        rx.stop()


@pytest.fixture(params=["fast", "pynetdicom"])
def mwl_scp(
    request: pytest.FixtureRequest, mwl_receivers: Callable[..., int]
) -> Callable[..., int]:
    """Factory as :func:`mwl_receivers`, C-FIND served on each DIMSE path in turn."""
    return functools.partial(mwl_receivers, path=request.param)


def findscu(
    port: int, out: Path, *args: str, query: Path | None = None, aec: str | None = "VANNAHCLOUD"
) -> tuple[list[pydicom.Dataset], subprocess.CompletedProcess[str]]:
    """Run ``findscu -W -X`` and return the extracted responses (and the process)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    called = ["-aec", aec] if aec else []
    cmd = ["findscu", "-W", "-X", "-od", str(out), *called, *args, "127.0.0.1", str(port)]
    if query is not None:
        cmd.append(str(query))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    responses = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return responses, proc


def dump2dcm(dump: Path, target: Path) -> Path:
    subprocess.run(["dump2dcm", "-q", str(dump), str(target)], check=True, timeout=30)
    return target


@pytest.fixture(scope="session")
def dcmtk_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(worklist db folder with OFFIS/*.wl + lockfile, folder of query .dcm files)."""
    root = tmp_path_factory.mktemp("dcmtk")
    db, queries = root / "db" / "OFFIS", root / "queries"
    db.mkdir(parents=True)
    queries.mkdir()
    (db / "lockfile").touch()
    for dump in sorted(WLISTDB.glob("*.dump")):
        subprocess.run(["dump2dcm", "-q", "-g", str(dump), str(db / f"{dump.stem}.wl")], check=True)
    for dump in sorted(WLISTQRY.glob("*.dump")):
        dump2dcm(dump, queries / f"{dump.stem}.dcm")
    return db, queries


@pytest.fixture(scope="session")
def wlmscpfs(dcmtk_files: tuple[Path, Path]) -> Iterator[int]:
    """DCMTK's own worklist SCP on the same files: the independent expectation."""
    db, _ = dcmtk_files
    port = free_port()
    proc = subprocess.Popen(
        ["wlmscpfs", "-dfp", str(db.parent), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(10)


def today() -> str:
    from datetime import datetime

    return datetime.now().strftime("%Y%m%d")


def step_fields(**overrides: Any) -> dict[str, Any]:
    """A valid REST body / step for today (generated test data, no real patient)."""
    fields: dict[str, Any] = {
        "step_id": "SPS1",
        "patient_name": "DOE^JANE",
        "patient_id": "PID001",
        "patient_birth_date": "19800101",
        "patient_sex": "F",
        "accession_number": "ACC001",
        "referring_physician_name": "HOUSE^GREGORY",
        "requested_procedure_id": "RP001",
        "requested_procedure_description": "CT CHEST",
        "requested_procedure_priority": "ROUTINE",
        "modality": "CT",
        "scheduled_station_ae_title": "CT01",
        "scheduled_station_name": "CTROOM1",
        "scheduled_procedure_step_start_date": today(),
        "scheduled_procedure_step_start_time": "235900",
        "scheduled_performing_physician_name": "TECH^TOM",
        "scheduled_procedure_step_description": "CHEST W/O CONTRAST",
    }
    fields.update(overrides)
    return fields
