"""Starting and stopping the service processes tests run in their own process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the process group, wait up to `grace` seconds, then SIGKILL what is left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def dicomweb_process(
    env: dict[str, str], port: int, log: Path, timeout: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m dicomweb`` in its own process group with `env` (VANNAH_* settings; its
    output to `log`), yielded once it accepts connections on `port`; stopped after."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dicomweb"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "python -m dicomweb did not start"
                time.sleep(0.1)
        yield process
    finally:
        stop_process_group(process)
