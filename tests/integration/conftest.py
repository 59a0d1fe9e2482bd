"""Real servers for integration tests: PostgreSQL and the Dagster daemon, on loopback."""

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import stop_process_group
from tests.receiver.receiver_support import free_port
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dagster_home import prepare_dagster_home
from vannah_pipelines.platform import PROJECT_DIR, dagster_daemon_argv, prepare_data_dir
from vannah_pipelines.settings import load_settings


def _pg_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        pytest.fail("PostgreSQL server binaries missing: run .ci/bootstrap (make test does)")
    return candidates[-1].parent


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb refuses to run as root: drop to the postgres user Debian's package creates.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1; yields a dagster-postgres URL."""
    bin_dir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="vannah-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    port = free_port()
    subprocess.run(
        _as_postgres(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "vannah", "--auth=trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        _as_postgres(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-l",
                str(root / "log"),
                "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            _as_postgres(
                [
                    str(bin_dir.parent / "bin" / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "vannah",
                    "dagster",
                ]
            ),
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg2://vannah@127.0.0.1:{port}/dagster"
    finally:
        subprocess.run(
            _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


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
            time.sleep(0.5)
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


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "data")
    try:
        yield d
    finally:
        stop_process_group(d.process)
