"""Test support for the receiver: a real ``python -m receiver`` subprocess, landing readers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom.data
from pynetdicom.dsutils import split_dataset

from receiver.app import ReusePortAssociationServer
from receiver.fast_store import FastStore
from tests.servers import free_port as free_port  # re-exported: the tests import it from here
from tests.servers import free_ports as free_ports

REPO = Path(__file__).resolve().parents[2]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
START_DEADLINE = 60.0  # a deadline for "never came up", not a performance threshold
WORKER_DEADLINE = 30.0  # bounds a hang, not a performance threshold


@dataclass
class ReceiverProcess:
    """``python -m receiver`` in its own process group, on a tmp data folder."""

    data_dir: Path
    port: int = 0
    workers: int = 2
    env: dict[str, str] = field(default_factory=dict)
    preexec_fn: Callable[[], None] | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    runs: int = 0

    def start(self) -> ReceiverProcess:
        self.runs += 1
        port_file = self.data_dir.parent / f"receiver-{self.runs}.port"
        self.log_path = self.data_dir.parent / f"receiver-{self.runs}.log"
        env = {
            **os.environ,
            "VANNAH_DATA_DIR": str(self.data_dir),
            "VANNAH_DICOM_PORT": str(self.port),
            "VANNAH_RECEIVER_WORKERS": str(self.workers),
            "VANNAH_LANDING_BATCH_MAX_AGE_SECONDS": "0.5",
            **self.env,
        }
        port_file.unlink(missing_ok=True)  # left by an earlier receiver on this folder
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "receiver", "--port-file", str(port_file)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self.preexec_fn,
            )
        deadline = time.monotonic() + START_DEADLINE
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"receiver did not start:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> int:
        """SIGTERM the supervisor and wait: it stops the workers, which seal their batches."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        _assert_group_gone(self.proc.pid)
        return code

    def kill_group(self) -> None:
        """SIGKILL the supervisor and every worker at once (a power cut, for the process)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        _assert_group_gone(self.proc.pid)


def _assert_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"receiver process group {pgid} left processes behind")


@dataclass(frozen=True)
class Landed:
    path: Path
    batch_id: str
    receipt: dict[str, str] | None

    def dataset_bytes(self) -> bytes:
        _meta, offset = split_dataset(self.path)
        return self.path.read_bytes()[offset:]


def sealed_instances(data_dir: Path) -> dict[str, list[Landed]]:
    """Every committed instance in ``landing/sealed``, by SOP Instance UID."""
    found: dict[str, list[Landed]] = {}
    sealed = data_dir / "landing" / "sealed"
    if not sealed.exists():
        return found
    for batch in sorted(sealed.iterdir()):
        receipts: dict[str, dict[str, str]] = {}
        receipts_path = batch / "receipts.jsonl"
        if receipts_path.exists():
            for line in receipts_path.read_text().splitlines():
                record = json.loads(line)
                receipts[record["sop_instance_uid"]] = record
        for path in sorted(batch.glob("*.dcm")):
            if path.name.startswith(".tmp-"):
                continue
            found.setdefault(path.stem, []).append(
                Landed(path, batch.name, receipts.get(path.stem))
            )
    return found


def wait_sealed(data_dir: Path, uids: set[str], deadline: float = 30.0) -> dict[str, list[Landed]]:
    """Wait until every UID in `uids` is in a sealed batch (batches seal by age)."""
    end = time.monotonic() + deadline
    while True:
        found = sealed_instances(data_dir)
        if uids <= found.keys() or time.monotonic() > end:
            return found
        time.sleep(0.1)


def dataset_bytes_of_file(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


# storescu proposes a compressed transfer syntax only when told to (storescu --help).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": [],
    "1.2.840.10008.1.2.1": [],
    "1.2.840.10008.1.2.2": ["-xb"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
    "1.2.840.10008.1.2.5": ["-xr"],
}


def pydicom_files_with_meta() -> dict[Path, str]:
    """pydicom's bundled test files that have file meta, with their transfer syntax.

    (``get_testdata_files`` also tries to download more files, which costs seconds here; the
    bundled folder is the same set without the network.)
    """
    files: dict[Path, str] = {}
    for path in sorted(TEST_FILES.rglob("*.dcm")):
        try:
            meta, _ = split_dataset(path)
            files[path] = str(meta.TransferSyntaxUID)
        except Exception:  # no meta, no transfer syntax: storescu -f territory, not ours
            continue
    return files


def storescu_outcomes(output: str) -> dict[str, str]:
    """file -> 'success' | the failure storescu printed, from its -v output."""
    outcomes: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        if m := re.match(r"I: Sending file: (.*)$", line):
            current = m.group(1).strip()
            outcomes[current] = "not sent"
        elif current and "Received Store Response (Success)" in line:
            outcomes[current] = "success"
        elif (current and "Received Store Response" in line) or (
            current and line.startswith("E: ") and outcomes[current] == "not sent"
        ):
            outcomes[current] = line.strip()
    return outcomes


@dataclass
class Worker:
    """One in-process worker server, fast path on or off."""

    server: ReusePortAssociationServer
    port: int
    data_dir: Path

    @property
    def fast(self) -> FastStore:
        assert self.server.fast_store is not None
        return self.server.fast_store

    def wait_idle(self) -> None:
        """Wait until no association runs on either path."""
        deadline = time.monotonic() + WORKER_DEADLINE
        while self.server.running_associations():
            assert time.monotonic() < deadline, "associations did not end"
            time.sleep(0.01)

    def landed(self) -> list[Path]:
        """Every instance file (or temp file) under the landing zone."""
        root = self.data_dir / "landing"
        return [p for p in root.rglob("*") if p.suffix == ".dcm" or ".tmp-" in p.name]
