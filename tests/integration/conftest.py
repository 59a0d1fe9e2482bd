"""Real servers for integration tests: PostgreSQL and the Dagster daemon, on loopback."""

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import stop_process_group
from tests.servers import PostgresServer
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dagster_home import prepare_dagster_home
from vannah_pipelines.platform import PROJECT_DIR, dagster_daemon_argv, prepare_data_dir
from vannah_pipelines.settings import load_settings


@pytest.fixture(scope="session")
def postgres_url(postgres: PostgresServer) -> str:
    """A database for Dagster on the session's PostgreSQL server: a dagster-postgres URL."""
    postgres.create_database("dagster")
    return postgres.url("dagster", driver="postgresql+psycopg2")


@dataclass
class Daemon:
    data_dir: Path
    dagster_home: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]

    def wait_for_instances(self, count: int, timeout: float = 120.0) -> CatalogReader:
        reader = CatalogReader(self.data_dir / "catalog")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reader.refresh()
            if reader.query("SELECT count(*) FROM instances")[0][0] >= count:
                return reader
            assert self.process.poll() is None, "dagster-daemon died"
            time.sleep(0.2)
        log = (self.data_dir / "daemon.log").read_text(errors="replace")[-4000:]
        pytest.fail(f"catalog did not reach {count} instances in {timeout}s; daemon log:\n{log}")


def start_daemon(
    data_dir: Path, instance_yaml: Path | None = None, extra_env: dict[str, str] | None = None
) -> Daemon:
    """Start `dagster-daemon run` the way `make up` does, on `data_dir`."""
    env = prepare_data_dir(load_settings(data_dir=data_dir))
    env.update(extra_env or {})
    home = Path(env["DAGSTER_HOME"])
    if instance_yaml is not None:
        shutil.copyfile(instance_yaml, home / "dagster.yaml")
    prepare_dagster_home(home, env)  # as `vannah up` does: once, before the daemon
    log = (data_dir / "daemon.log").open("wb")
    process = subprocess.Popen(
        dagster_daemon_argv(),
        env=env,
        cwd=PROJECT_DIR,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Daemon(data_dir, home, env, process)


def stop_daemon(daemon: Daemon) -> None:
    """Teardown: SIGKILL the daemon's process group (its runs and code server too). Dagster's
    graceful stop takes 4-6 s after the daemon threads have ended, and no test here judges
    it: `vannah up` stopping the daemon cleanly is test_platform's."""
    stop_process_group(daemon.process, grace=0)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "data")
    try:
        yield d
    finally:
        stop_daemon(d)
