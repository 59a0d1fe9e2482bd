"""The receiver stops on SIGTERM however many arrive at once: a signal handler that took
a lock (``threading.Event.set``) could be interrupted by the next signal inside that lock
and hang the process for good (seen in CI: a test fixture's SIGTERM followed by
``ReceiverProcess.stop``'s own)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from receiver_support import ReceiverProcess

pytestmark = pytest.mark.integration

SIGNALS = 200  # back to back, to the supervisor and its workers (the process group)
DEADLINE = 60.0  # bounds a hang; never a performance threshold


@pytest.mark.parametrize("target", ["supervisor", "group"])
def test_a_burst_of_sigterm_stops_the_receiver(tmp_path: Path, target: str) -> None:
    rx = ReceiverProcess(data_dir=tmp_path / "data", workers=2).start()
    assert rx.proc is not None
    pid = rx.proc.pid
    for _ in range(SIGNALS):
        if rx.proc.poll() is not None:
            break
        try:
            if target == "group":
                os.killpg(pid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            break
    deadline = time.monotonic() + DEADLINE
    while rx.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if rx.proc.poll() is None:
        os.killpg(pid, signal.SIGKILL)
        pytest.fail(f"the receiver did not stop after {SIGNALS} SIGTERMs:\n{rx.log()[-3000:]}")
    assert rx.proc.returncode == 0, rx.log()[-3000:]
    assert rx.stop() == 0  # the group is gone too
