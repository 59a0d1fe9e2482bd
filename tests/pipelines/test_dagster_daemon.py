"""The daemon `vannah up` runs wakes its sensors every second
(vannah_pipelines/dagster_daemon.py)."""

import logging
import subprocess

from vannah_pipelines.dagster_daemon import SENSOR_LOOP_SECONDS, set_sensor_loop
from vannah_pipelines.platform import dagster_daemon_argv


class _Shutdown:
    """A shutdown event that records how long Dagster's sensor loop asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return True

    def is_set(self) -> bool:
        return False


def _first_wait() -> float:
    from dagster._daemon.sensor import execute_sensor_iteration_loop

    shutdown = _Shutdown()
    # No workspace: the iteration fails at once (logged, as the daemon does), then the loop
    # sleeps until its next wake-up.
    loop = execute_sensor_iteration_loop(None, logging.getLogger("test"), shutdown)  # type: ignore[arg-type]
    while not shutdown.waits:
        next(loop)
    return shutdown.waits[0]


def test_dagsters_sensor_loop_waits_what_we_set_not_its_five_seconds() -> None:
    from dagster._daemon import sensor

    before = sensor.MIN_INTERVAL_LOOP_TIME
    try:
        assert _first_wait() > SENSOR_LOOP_SECONDS  # Dagster's own: 5 s
        set_sensor_loop()
        assert _first_wait() <= SENSOR_LOOP_SECONDS
    finally:
        sensor.MIN_INTERVAL_LOOP_TIME = before


def test_the_platform_runs_the_daemon_through_the_entry_point_that_sets_it() -> None:
    argv = dagster_daemon_argv()
    assert argv[1:3] == ["-m", "vannah_pipelines.dagster_daemon"]
    out = subprocess.run([*argv[:3], "run", "--help"], capture_output=True, text=True, check=True)
    assert "--workspace" in out.stdout  # Dagster's own CLI answers
