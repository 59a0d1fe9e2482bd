"""The embedded platform's Dagster instance folder: initialised once, repaired, then checked.

Dagster's SQLite storage initialised at the same moment by the webserver, the daemon and
their code servers can end with two ``alembic_version`` rows (dagster issue 27390); every
process then fails to open it, at every start. :func:`prepare_dagster_home` therefore
initialises the storage in one process (``dagster instance migrate``) before any service
opens it, and repairs a folder left broken by an earlier start: a database whose schema is
complete gets its version table set to the one head it has; any other broken storage is
moved aside whole (the landing zone is not touched, so every batch still waiting is
requested again by the sensor). :func:`wait_until_ingesting` then asks the webserver
whether the code location loaded, the sensor daemon is alive and the landing sensor ticks.

Stdlib only: Dagster runs in its own processes, reached through its CLI and GraphQL API.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vannah_pipelines.errors import VannahError

log = logging.getLogger(__name__)

SENSOR = "landed_batch_sensor"
# The SQLite databases Dagster's default storage keeps under DAGSTER_HOME.
_DATABASES = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")
_STORAGE_ENTRIES = ("history", "schedules", "storage", ".logs_queue", ".telemetry")


class DagsterStorageError(VannahError):
    """Dagster's instance storage cannot be initialised or repaired."""


class PlatformNotReadyError(VannahError):
    """Dagster did not come up able to ingest (code location, daemon or sensor)."""


def _dagster_cli() -> str:
    return str(Path(sys.executable).parent / "dagster")


def migrate(home: Path, env: Mapping[str, str], timeout: float = 300.0) -> None:
    """Create or upgrade the instance storage of `home` in this one process.

    Raises
    ------
    DagsterStorageError
        If ``dagster instance migrate`` fails (its last output lines are in the message).
    """
    result = subprocess.run(
        [_dagster_cli(), "instance", "migrate"],
        env={**env, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-6:])
        raise DagsterStorageError(f"dagster instance migrate failed in {home}:\n{tail}")


def _versions(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [row[0] for row in con.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.Error:
        return []
    finally:
        con.close()


def _schema(db: Path) -> set[tuple[str, str, str]]:
    """(kind, table, column-or-index) triples describing the database's schema."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        items: set[tuple[str, str, str]] = set()
        objects = con.execute(
            "SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ).fetchall()
        for kind, name, table in objects:
            if kind == "table":
                for column in con.execute("SELECT name FROM pragma_table_info(?)", (name,)):
                    items.add(("column", name, column[0]))
            elif kind == "index":
                items.add(("index", table, name))
        return items
    finally:
        con.close()


def broken_databases(home: Path) -> list[Path]:
    """The storage databases of `home` whose version table holds more than one row."""
    return [
        home / rel for rel in _DATABASES if (home / rel).exists() and len(_versions(home / rel)) > 1
    ]


def _reference(env: Mapping[str, str], dagster_yaml: Path) -> Path:
    """A freshly migrated instance folder: the schema and head a repaired one must match."""
    ref = Path(tempfile.mkdtemp(prefix="vannah-dagster-ref-"))
    shutil.copyfile(dagster_yaml, ref / "dagster.yaml")
    migrate(ref, env)
    return ref


def repair(home: Path, env: Mapping[str, str]) -> list[str]:
    """Repair the databases of `home` left with several alembic heads; returns what was done.

    A database whose tables, columns and indexes include all of a freshly migrated one's is
    stamped with that one's single head. Otherwise the storage is moved aside, whole, into
    ``<home>/broken-<time>/`` (kept for inspection) and starts anew.
    """
    broken = broken_databases(home)
    if not broken:
        return []
    actions: list[str] = []
    ref = _reference(env, home / "dagster.yaml")
    try:
        for db in broken:
            rel = db.relative_to(home)
            expected = _versions(ref / rel)
            if len(expected) == 1 and _schema(db) >= _schema(ref / rel):
                con = sqlite3.connect(db)
                try:
                    with con:
                        con.execute("DELETE FROM alembic_version")
                        con.execute("INSERT INTO alembic_version VALUES (?)", (expected[0],))
                finally:
                    con.close()
                actions.append(f"{rel}: version table reset to {expected[0]} (schema complete)")
            else:
                actions.append(f"{rel}: schema incomplete; storage moved aside")
                actions.append(move_storage_aside(home))
                break
    finally:
        shutil.rmtree(ref, ignore_errors=True)
    for action in actions:
        log.warning("Dagster storage repaired: %s", action)
    return actions


def move_storage_aside(home: Path) -> str:
    """Move Dagster's storage of `home` (runs, events, schedules) into ``broken-<time>/``."""
    aside = home / f"broken-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for name in _STORAGE_ENTRIES:
        if (home / name).exists():
            (home / name).rename(aside / name)
    return f"old storage kept in {aside}"


def prepare_dagster_home(home: Path, env: Mapping[str, str]) -> list[str]:
    """Initialise (or upgrade) the instance storage of `home` once, repairing it first.

    Call before starting any process that opens the storage. Returns the repairs made.

    Raises
    ------
    DagsterStorageError
        If the storage still cannot be migrated after repair.
    """
    actions = repair(home, env)
    try:
        migrate(home, env)
    except DagsterStorageError:
        if not (home / "history").exists() and not (home / "schedules").exists():
            raise
        # Storage that is broken in some other way: start anew, keep the old one aside.
        actions.append(move_storage_aside(home))
        log.warning("Dagster storage could not be migrated; %s", actions[-1])
        migrate(home, env)
    still = broken_databases(home)
    if still:
        raise DagsterStorageError(f"Dagster storage still has several heads: {still}")
    return actions


@dataclass
class Readiness:
    """What the webserver says about ingest, and whether that is enough to take images."""

    location_loaded: bool = False
    location_error: str = ""
    sensor_daemon_healthy: bool = False
    sensor_running: bool = False
    sensor_ticked: bool = False
    sensor_error: str = ""

    @property
    def ready(self) -> bool:
        return (
            self.location_loaded
            and self.sensor_daemon_healthy
            and self.sensor_running
            and self.sensor_ticked
        )

    def problem(self) -> str:
        if self.location_error:
            return f"the code location failed to load: {self.location_error}"
        if not self.location_loaded:
            return "the code location has not loaded"
        if self.sensor_error:
            return f"{SENSOR} fails: {self.sensor_error}"
        if not self.sensor_daemon_healthy:
            return "the Dagster daemon's sensor loop is not running"
        if not self.sensor_running:
            return f"{SENSOR} is not running"
        if not self.sensor_ticked:
            return f"{SENSOR} has not evaluated since start-up"
        return "ready"


_QUERY = """{
  workspaceOrError { __typename ... on Workspace { locationEntries {
    loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } }
  instance { daemonHealth { allDaemonStatuses { daemonType healthy } } }
  repositoriesOrError { __typename ... on RepositoryConnection { nodes { sensors {
    name sensorState { status ticks(limit: 5) { status timestamp error { message } } } } } } }
}"""


def readiness(graphql_url: str, since: float, timeout: float = 10.0) -> Readiness:
    """Ask the webserver at `graphql_url` whether ingest works (sensor ticks after `since`).

    Raises
    ------
    OSError
        If the webserver does not answer (yet).
    """
    request = urllib.request.Request(
        graphql_url,
        data=json.dumps({"query": _QUERY}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = json.loads(response.read())["data"]
    state = Readiness()
    workspace = data.get("workspaceOrError") or {}
    entries = workspace.get("locationEntries") or []
    for entry in entries:
        located = entry.get("locationOrLoadError") or {}
        if located.get("__typename") == "PythonError":
            state.location_error = str(located.get("message", ""))[:500]
    state.location_loaded = bool(entries) and all(
        e.get("loadStatus") == "LOADED"
        and (e.get("locationOrLoadError") or {}).get("__typename") == "RepositoryLocation"
        for e in entries
    )
    statuses = ((data.get("instance") or {}).get("daemonHealth") or {}).get(
        "allDaemonStatuses"
    ) or []
    state.sensor_daemon_healthy = any(
        s.get("daemonType") == "SENSOR" and s.get("healthy") for s in statuses
    )
    repos = (data.get("repositoriesOrError") or {}).get("nodes") or []
    for repo in repos:
        for sensor in repo.get("sensors") or []:
            if sensor.get("name") != SENSOR:
                continue
            sensor_state = sensor.get("sensorState") or {}
            state.sensor_running = sensor_state.get("status") == "RUNNING"
            for tick in sensor_state.get("ticks") or []:
                if float(tick.get("timestamp") or 0) < since:
                    continue
                if tick.get("status") == "FAILURE":
                    state.sensor_error = str((tick.get("error") or {}).get("message", ""))[:500]
                else:
                    state.sensor_ticked = True
    return state


def wait_until_ingesting(
    graphql_url: str,
    since: float,
    timeout: float,
    alive: Callable[[], str | None],
    poll: float = 1.0,
) -> Readiness:
    """Poll :func:`readiness` until ingest works, a service dies or `timeout` passes.

    `alive` returns the name of a service that exited, or None while all run.

    Raises
    ------
    PlatformNotReadyError
        With what is missing, if ingest does not work in time or a service died.
    """
    deadline = time.monotonic() + timeout
    state = Readiness()
    last_error = "the Dagster webserver does not answer yet"
    while True:
        dead = alive()
        if dead:
            raise PlatformNotReadyError(f"ingest does not work: {dead} exited at start-up")
        try:
            state = readiness(graphql_url, since)
            if state.ready:
                return state
            last_error = state.problem()
            if state.sensor_error or state.location_error:
                raise PlatformNotReadyError(f"ingest does not work: {last_error}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            last_error = f"the Dagster webserver does not answer: {exc}"
        if time.monotonic() >= deadline:
            raise PlatformNotReadyError(f"ingest does not work after {timeout:.0f} s: {last_error}")
        time.sleep(poll)
