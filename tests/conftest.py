"""Suite-wide set-up: the tests' own pynetdicom SCUs get the same reactor-race fix as the
receiver (receiver/pynetdicom_fixes.py); without it a loaded machine loses responses."""

from collections.abc import Iterator
from pathlib import Path

from receiver import pynetdicom_fixes

pynetdicom_fixes.install()


import pytest  # noqa: E402  (after the fix above, which must come first)

from tests.servers import (  # noqa: E402
    PostgresServer,
    S3Server,
    postgres_server,
    seaweedfs_server,
)
from vannah_pipelines.landing import layout  # noqa: E402

S3_TEST_BUCKET = "vannah-test"


@pytest.fixture
def synced_dirs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every folder fsynced through ``landing.layout.fsync_dir`` during the test, in order
    (the real fsync still runs)."""
    synced: list[Path] = []
    real = layout.fsync_dir

    def spy(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(layout, "fsync_dir", spy)
    return synced


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server on 127.0.0.1 for the session (tests/servers.py)."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 for the session, with the bucket ``vannah-test``."""
    with seaweedfs_server(buckets=(S3_TEST_BUCKET,)) as server:
        yield server
