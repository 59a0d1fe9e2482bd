"""Suite-wide set-up: the tests' own pynetdicom SCUs get the same reactor-race fix as the
receiver (receiver/pynetdicom_fixes.py); without it a loaded machine loses responses."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from receiver import pynetdicom_fixes

pynetdicom_fixes.install()


import pytest  # noqa: E402  (after the fix above, which must come first)

from tests.servers import (  # noqa: E402
    PostgresServer,
    S3Server,
    moto_server,
    postgres_server,
    seaweedfs_server,
)
from vannah_pipelines.landing import layout  # noqa: E402

if TYPE_CHECKING:
    from vannah_pipelines.catalog.lake import LakeConfig

S3_TEST_BUCKET = "vannah-test"
COLD_TEST_BUCKET = "vannah-cold-test"


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


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 for the session (the cold tier), with its bucket."""
    with moto_server(buckets=(COLD_TEST_BUCKET,)) as server:
        yield server


def object_tier_settings(warm: S3Server, cold: S3Server) -> dict[str, object]:
    """Settings putting the warm tier on `warm` (SeaweedFS, minio SDK) and the cold tier on
    `cold` (moto, boto3, DEEP_ARCHIVE), each under a fresh key prefix."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    return {
        "warm_storage": "s3",
        "warm_s3_endpoint": warm.endpoint,
        "warm_s3_bucket": S3_TEST_BUCKET,
        "warm_s3_prefix": prefix,
        "warm_s3_access_key": warm.access_key,
        "warm_s3_secret_key": warm.secret_key,
        "warm_s3_region": warm.region,
        "warm_s3_secure": False,
        "cold_storage": "s3-archive",
        "cold_s3_endpoint_url": cold.url,
        "cold_s3_bucket": COLD_TEST_BUCKET,
        "cold_s3_prefix": prefix,
        "cold_s3_access_key": cold.access_key,
        "cold_s3_secret_key": cold.secret_key,
        "cold_s3_region": cold.region,
        "cold_storage_class": "DEEP_ARCHIVE",
    }


@pytest.fixture
def object_tiers(seaweedfs: S3Server, moto_s3: S3Server) -> dict[str, object]:
    """Settings of a warm tier on SeaweedFS and a cold tier on moto (fresh prefixes)."""
    return object_tier_settings(seaweedfs, moto_s3)


def new_lake(postgres: PostgresServer, seaweedfs: S3Server) -> LakeConfig:
    """A new, empty DuckLake: a fresh PostgreSQL database and a fresh prefix in the bucket."""
    from vannah_pipelines.catalog.lake import LakeConfig  # DuckDB only for the tests using it

    name = f"lake_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    return LakeConfig(
        postgres=postgres.libpq(name),
        data_path=f"s3://{S3_TEST_BUCKET}/{name}/",
        s3_key_id=seaweedfs.access_key,
        s3_secret=seaweedfs.secret_key,
        s3_endpoint=seaweedfs.endpoint,
        s3_region=seaweedfs.region,
        s3_use_ssl=False,
    )


def lake_settings(config: LakeConfig) -> dict[str, object]:
    """The ``catalog_lake_*`` settings that describe `config` (for Settings(**...))."""
    return {
        "catalog_lake_postgres": config.postgres,
        "catalog_lake_data_path": config.data_path,
        "catalog_lake_s3_endpoint": config.s3_endpoint,
        "catalog_lake_s3_key_id": config.s3_key_id,
        "catalog_lake_s3_secret": config.s3_secret,
        "catalog_lake_s3_region": config.s3_region,
        "catalog_lake_s3_use_ssl": config.s3_use_ssl,
    }


@pytest.fixture
def lake_config(postgres: PostgresServer, seaweedfs: S3Server) -> LakeConfig:
    """A new lake on the session's PostgreSQL and SeaweedFS servers."""
    return new_lake(postgres, seaweedfs)
