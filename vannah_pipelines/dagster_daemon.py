"""``dagster-daemon``, with sensors evaluated as often as they ask for.

    python -m vannah_pipelines.dagster_daemon run -w workspace.yaml   # what `vannah up` runs

Dagster's sensor daemon wakes at most every 5 s (``MIN_INTERVAL_LOOP_TIME`` in
``dagster/_daemon/sensor.py``: a constant, not an instance setting), so a sensor's
``minimum_interval_seconds`` under 5 s is not honoured. The landing sensor asks for 1 s and
ticked every 5 s, which added 2.5 s on average, and up to 5 s, to each instance's way from
its acknowledgement to the catalog, and so to routing (docs/benchmarks.md). This entry point
sets the daemon's wake-up to :data:`SENSOR_LOOP_SECONDS`, then runs Dagster's own CLI. A
wake-up reads the sensors' states from the instance's storage; only the sensors whose
interval has passed are evaluated.

Dagster is pinned (pyproject.toml); if an upgrade removes the constant, the daemon refuses
to start rather than silently tick every 5 s again.
"""

import sys

SENSOR_LOOP_SECONDS = 1


def set_sensor_loop(seconds: float = SENSOR_LOOP_SECONDS) -> None:
    """Make the sensor daemon of this process wake every `seconds`."""
    from dagster._daemon import sensor

    current = getattr(sensor, "MIN_INTERVAL_LOOP_TIME", None)
    if not isinstance(current, int | float):
        raise RuntimeError(
            "dagster._daemon.sensor.MIN_INTERVAL_LOOP_TIME is gone (Dagster upgraded?): "
            "sensors would tick every 5 s; update vannah_pipelines/dagster_daemon.py"
        )
    sensor.MIN_INTERVAL_LOOP_TIME = seconds  # type: ignore[assignment]


def main() -> None:
    from dagster._daemon.cli import main as dagster_daemon

    set_sensor_loop()
    sys.argv[0] = "dagster-daemon"
    dagster_daemon()  # a click command: exits the process itself


if __name__ == "__main__":
    main()
