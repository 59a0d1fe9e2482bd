"""Run the whole embedded platform as child processes: receiver, Dagster webserver and daemon.

Stdlib only: the services are separate processes, started with the same interpreter and
the same ``VANNAH_*`` environment (``VANNAH_CONFIG`` included, so a ``--config`` file reaches
every one of them), stopped together (no orphans) on Ctrl-C or SIGTERM.

Start-up order: Dagster's storage is initialised (or repaired) once, then the Dagster daemon
and webserver start, and only once the webserver says the code location loaded and the
landing sensor ticks do the receiver, DICOMweb and MLLP listeners start: a platform that
cannot ingest never acknowledges an image.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vannah_pipelines.catalog.compaction import ensure_catalog
from vannah_pipelines.catalog.writer import CATALOG_DB
from vannah_pipelines.dagster_home import (
    PlatformNotReadyError,
    prepare_dagster_home,
    wait_until_ingesting,
)
from vannah_pipelines.errors import VannahError
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.settings import Settings
from vannah_pipelines.viewer.fetch import is_fetched

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent


@dataclass
class Service:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None


def prepare_data_dir(settings: Settings, config_file: Path | None = None) -> dict[str, str]:
    """Create the data folders and the Dagster home; return the services' environment.

    `config_file` (else ``$VANNAH_CONFIG``) is passed on as an absolute ``VANNAH_CONFIG``:
    the services run in the project folder, where a relative path would name another file.
    """
    data = settings.data_dir.resolve()
    LandingZone(settings.landing_dir).ensure()
    for folder in (settings.hot_dir, settings.quarantine_dir, settings.catalog_dir):
        folder.mkdir(parents=True, exist_ok=True)
    ensure_catalog(settings.catalog_dir)
    dagster_home = data / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROJECT_DIR / "dagster.yaml", dagster_home / "dagster.yaml")
    env = dict(os.environ)
    config = config_file or (Path(env["VANNAH_CONFIG"]) if env.get("VANNAH_CONFIG") else None)
    if config is not None:
        env["VANNAH_CONFIG"] = str(config.resolve())
    env.update(
        VANNAH_DATA_DIR=str(data),
        DAGSTER_HOME=str(dagster_home),
        PYTHONUNBUFFERED="1",
        TCP_NODELAY="1",
    )
    return env


def dagster_daemon_argv(log_level: str = "info") -> list[str]:
    """The daemon (sensors, run queue) on this project's workspace; sensors tick as often
    as they ask (vannah_pipelines/dagster_daemon.py)."""
    workspace = PROJECT_DIR / "workspace.yaml"
    return [
        sys.executable,
        "-m",
        "vannah_pipelines.dagster_daemon",
        "run",
        "-w",
        str(workspace),
        "--log-level",
        log_level,
    ]


def dagster_services(settings: Settings) -> list[Service]:
    """The Dagster daemon and webserver: started first, on an initialised storage."""
    bin_dir = Path(sys.executable).parent
    workspace = str(PROJECT_DIR / "workspace.yaml")
    return [
        # The sensor logs every tick at INFO; runs and their logs are in the UI.
        Service("dagster-daemon", dagster_daemon_argv("warning")),
        Service(
            "dagster-webserver",
            [
                str(bin_dir / "dagster-webserver"),
                "-w",
                workspace,
                "-h",
                settings.dagster_host,
                "-p",
                str(settings.dagster_port),
            ],
        ),
    ]


def intake_services() -> list[Service]:
    """The services that take images and orders: started once ingest is known to work."""
    py = sys.executable
    return [
        Service("receiver", [py, "-m", "receiver"]),
        Service("dicomweb", [py, "-m", "dicomweb"]),
        Service("hl7-mllp", [str(Path(py).parent / "vannah"), "worklist", "mllp"]),
    ]


def _shown(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def viewer_lines(settings: Settings, web: str) -> list[str]:
    """The banner's line for the built-in viewer (none when it is turned off)."""
    if not settings.viewer_enabled:
        return []
    if not is_fetched(settings.viewer_cache_dir):
        return ["  Viewer (OHIF)    not fetched: /viewer answers 503 (run `vannah viewer fetch`)"]
    scheme = "https" if settings.ssl_enabled else "http"
    return [f"  Viewer (OHIF)    {scheme}://{web}:{settings.dicomweb_port}/viewer"]


def check_viewer(settings: Settings) -> None:
    """Log whether the built-in viewer can be served (the services start either way)."""
    if settings.viewer_enabled and not is_fetched(settings.viewer_cache_dir):
        log.warning(
            "the built-in viewer is enabled but not fetched into %s: /viewer answers 503 "
            "until `vannah viewer fetch` (or `make up`) downloads it; "
            "VANNAH_VIEWER_ENABLED=false turns it off",
            settings.viewer_cache_dir,
        )


def banner(settings: Settings) -> str:
    """Where everything answers."""
    dicom = _shown(settings.dicom_bind_host)
    web = _shown(settings.dicomweb_bind_host)
    scheme = "https" if settings.ssl_enabled else "http"
    tls = " +tls KEY CERT +cf CA" if settings.dicom_tls_enabled else ""
    auth = "; credentials required" if settings.authentication_enabled else ""
    return "\n".join(
        [
            "VannahHealthCloud is up (ingest checked: code location loaded, sensor running):",
            f"  DIMSE receiver   {settings.dicom_aet}@{dicom}:{settings.dicom_port}"
            f"   (echoscu{tls} -aec {settings.dicom_aet} {dicom} {settings.dicom_port})",
            f"  DICOMweb         {scheme}://{web}:{settings.dicomweb_port}/dicom-web"
            f"   (QIDO-RS, WADO-RS, STOW-RS, WADO-URI{auth})",
            *viewer_lines(settings, web),
            f"  HL7 v2 (MLLP)    {_shown(settings.mllp_bind_host)}:{settings.worklist_mllp_port}"
            "   (ORM^O01 orders -> Modality Worklist)",
            f"  Dagster UI       http://{_shown(settings.dagster_host)}:{settings.dagster_port}",
            f"  catalog (DuckDB) {(settings.catalog_dir / CATALOG_DB).resolve()}",
            f"  data folder      {settings.data_dir.resolve()}",
            "Ctrl-C stops everything.",
        ]
    )


def run_platform(
    settings: Settings, config_file: Path | None = None, ready_timeout: float = 300.0
) -> int:
    """Start every service, supervise them, stop them all on a signal or if one exits.

    Returns 0 after a requested stop; non-zero, with the reason logged, if a service exits
    or if ingest does not work within `ready_timeout` seconds of the Dagster start.
    """
    env = prepare_data_dir(settings, config_file)
    check_viewer(settings)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    started: list[Service] = []

    def start(group: list[Service]) -> None:
        for service in group:
            # Own process group, so a stop reaches the service's own children too.
            service.process = subprocess.Popen(
                service.argv, env=env, cwd=PROJECT_DIR, start_new_session=True
            )
            started.append(service)
            log.info("started %s (pid %d)", service.name, service.process.pid)

    def exited() -> str | None:
        if stopping:
            return "the platform (stop requested)"
        for service in started:
            assert service.process is not None
            if service.process.poll() is not None:
                return f"{service.name} (exit code {service.process.returncode})"
        return None

    exit_code = 0
    try:
        prepare_dagster_home(Path(env["DAGSTER_HOME"]), env)  # logs any repair
        since = time.time()
        start(dagster_services(settings))
        graphql = f"http://{_shown(settings.dagster_host)}:{settings.dagster_port}/graphql"
        wait_until_ingesting(graphql, since, ready_timeout, exited)
        if stopping:
            return 0
        start(intake_services())
        for host, port in (
            (settings.dicom_bind_host, settings.dicom_port),
            (settings.dicomweb_bind_host, settings.dicomweb_port),
            (settings.mllp_bind_host, settings.worklist_mllp_port),
        ):
            wait_listening(_shown(host), port, ready_timeout, exited)
        sys.stdout.write(banner(settings) + "\n")
        sys.stdout.flush()
        while not stopping:
            dead = exited()
            if dead and not stopping:
                log.error("%s exited; stopping the platform", dead)
                exit_code = 1
                break
            time.sleep(0.5)
    except PlatformNotReadyError as exc:
        if stopping:
            return 0
        sys.stderr.write(
            f"vannah up: ERROR: {exc}\n"
            "  Every service is stopped: nothing takes images it could not index.\n"
            "  The logs above say why; docs/deployment.md, 'Start-up checks'.\n"
        )
        exit_code = 3
    except VannahError as exc:
        sys.stderr.write(f"vannah up: ERROR: {exc}\n")
        exit_code = 3
    finally:
        stop_services(started)
    return exit_code


def wait_listening(host: str, port: int, timeout: float, exited: Callable[[], str | None]) -> None:
    """Wait until `host`:`port` accepts a connection.

    Raises
    ------
    PlatformNotReadyError
        If a service exits first or `timeout` passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        dead = exited()
        if dead:
            raise PlatformNotReadyError(f"{dead} exited while the platform was starting")
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise PlatformNotReadyError(f"nothing listens on {host}:{port}") from None
        time.sleep(0.1)


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
