"""Run the whole embedded platform as child processes: receiver, Dagster webserver and daemon.

Stdlib only: the services are separate processes, started with the same interpreter and
the same ``VANNAH_*`` environment, stopped together (no orphans) on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vannah_pipelines.catalog.writer import CATALOG_DB, CatalogWriter
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent


@dataclass
class Service:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None


def prepare_data_dir(settings: Settings) -> dict[str, str]:
    """Create the data folders and the Dagster home; return the services' environment."""
    data = settings.data_dir.resolve()
    LandingZone(settings.landing_dir).ensure()
    for folder in (settings.hot_dir, settings.quarantine_dir, settings.catalog_dir):
        folder.mkdir(parents=True, exist_ok=True)
    CatalogWriter(settings.catalog_dir).ensure()
    dagster_home = data / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROJECT_DIR / "dagster.yaml", dagster_home / "dagster.yaml")
    env = dict(os.environ)
    env.update(
        VANNAH_DATA_DIR=str(data),
        DAGSTER_HOME=str(dagster_home),
        PYTHONUNBUFFERED="1",
        TCP_NODELAY="1",
    )
    return env


def dagster_daemon_argv(log_level: str = "info") -> list[str]:
    """The daemon (sensors, run queue) on this project's workspace."""
    daemon = Path(sys.executable).parent / "dagster-daemon"
    workspace = PROJECT_DIR / "workspace.yaml"
    return [str(daemon), "run", "-w", str(workspace), "--log-level", log_level]


def services(settings: Settings) -> list[Service]:
    py = sys.executable
    bin_dir = Path(py).parent
    workspace = str(PROJECT_DIR / "workspace.yaml")
    return [
        Service("receiver", [py, "-m", "receiver"]),
        Service("dicomweb", [py, "-m", "dicomweb"]),
        Service("hl7-mllp", [str(bin_dir / "vannah"), "worklist", "mllp"]),
        # The sensor logs every tick at INFO; runs and their logs are in the UI.
        Service("dagster-daemon", dagster_daemon_argv("warning")),
        Service(
            "dagster-webserver",
            [
                str(bin_dir / "dagster-webserver"),
                "-w",
                workspace,
                "-h",
                settings.bind_host,
                "-p",
                str(settings.dagster_port),
            ],
        ),
    ]


def banner(settings: Settings) -> str:
    """Where everything answers."""
    host = "127.0.0.1" if settings.bind_host == "127.0.0.1" else settings.bind_host
    return "\n".join(
        [
            "VannahHealthCloud is up:",
            f"  DIMSE receiver   {settings.dicom_aet}@{host}:{settings.dicom_port}"
            f"   (echoscu -aec {settings.dicom_aet} {host} {settings.dicom_port})",
            f"  DICOMweb         http://{host}:{settings.dicomweb_port}/dicom-web"
            f"   (QIDO-RS, WADO-RS, STOW-RS, WADO-URI)",
            f"  HL7 v2 (MLLP)    {host}:{settings.worklist_mllp_port}"
            "   (ORM^O01 orders -> Modality Worklist)",
            f"  Dagster UI       http://{host}:{settings.dagster_port}",
            f"  catalog (DuckDB) {(settings.catalog_dir / CATALOG_DB).resolve()}",
            f"  data folder      {settings.data_dir.resolve()}",
            "Ctrl-C stops everything.",
        ]
    )


def run_platform(settings: Settings) -> int:
    """Start every service, supervise them, stop them all on a signal or if one exits."""
    env = prepare_data_dir(settings)
    procs = services(settings)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    try:
        for service in procs:
            # Own process group, so a stop reaches the service's own children too.
            service.process = subprocess.Popen(
                service.argv, env=env, cwd=PROJECT_DIR, start_new_session=True
            )
            log.info("started %s (pid %d)", service.name, service.process.pid)
        sys.stdout.write(banner(settings) + "\n")
        sys.stdout.flush()
        while not stopping:
            for service in procs:
                assert service.process is not None
                code = service.process.poll()
                if code is not None:
                    log.error("%s exited with %s; stopping the platform", service.name, code)
                    exit_code = code or 1
                    stopping = True
            time.sleep(0.5)
    finally:
        stop_services(procs)
    return exit_code


def stop_services(procs: list[Service], grace: float = 15.0) -> None:
    """SIGTERM every process group, wait, then SIGKILL what is left."""
    for service in procs:
        if service.process is not None and service.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for service in procs:
        if service.process is None:
            continue
        try:
            service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", service.name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait()
