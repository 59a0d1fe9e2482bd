"""`vannah up` (what `make up` runs): every service answers, Ctrl-C leaves no process behind."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.receiver.receiver_support import DCMTK_ENV, free_ports
from vannah_pipelines.platform import PROJECT_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


def _connects(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        return True


def _group_alive(pgid: int) -> list[str]:
    alive = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getpgid(int(proc.name)) == pgid:
                    alive.append((proc / "cmdline").read_text().replace("\0", " ")[:120])
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
    return alive


def test_vannah_up_serves_everything_and_stops_cleanly(tmp_path: Path) -> None:
    names = (
        "VANNAH_DICOM_PORT",
        "VANNAH_DAGSTER_PORT",
        "VANNAH_DICOMWEB_PORT",
        "VANNAH_WORKLIST_MLLP_PORT",
    )
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    env = {
        **os.environ,
        "VANNAH_DATA_DIR": str(tmp_path / "data"),
        **{k: str(v) for k, v in ports.items()},
    }
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [str(Path(sys.executable).parent / "vannah"), "up"],
        env=env,
        cwd=PROJECT_DIR,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120  # a deadline for "never came up", not a benchmark
        checks = {
            "dimse": lambda: (
                subprocess.run(
                    [
                        "echoscu",
                        "-aec",
                        "VANNAHCLOUD",
                        "127.0.0.1",
                        str(ports["VANNAH_DICOM_PORT"]),
                    ],
                    env=DCMTK_ENV,
                    capture_output=True,
                    timeout=10,
                ).returncode
                == 0
            ),
            "dicomweb": lambda: (
                _get(f"http://127.0.0.1:{ports['VANNAH_DICOMWEB_PORT']}/dicom-web/studies") == 200
            ),
            "dagster": lambda: (
                _get(f"http://127.0.0.1:{ports['VANNAH_DAGSTER_PORT']}/server_info") == 200
            ),
            "hl7-mllp": lambda: _connects(ports["VANNAH_WORKLIST_MLLP_PORT"]),
        }
        pending = dict(checks)
        while pending:
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"not answering: {list(pending)}"
            for name, check in list(pending.items()):
                try:
                    if check():
                        del pending[name]
                except OSError:
                    pass
            time.sleep(0.5)
        banner = (tmp_path / "up.log").read_text()
        assert f"VANNAHCLOUD@127.0.0.1:{ports['VANNAH_DICOM_PORT']}" in banner
        assert f"http://127.0.0.1:{ports['VANNAH_DAGSTER_PORT']}" in banner
        assert "catalog.duckdb" in banner
    finally:
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        try:
            code = up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    deadline = time.monotonic() + 20
    while _group_alive(up.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    # The services run in sessions of their own: none of their processes may survive.
    leftovers = [p for p in _all_cmdlines() if str(tmp_path) in p]
    assert not leftovers, leftovers


def _all_cmdlines() -> list[str]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out.append(
                    (proc / "cmdline").read_text().replace("\0", " ")
                    + " "
                    + (proc / "environ").read_text().replace("\0", " ")
                )
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
    return out
