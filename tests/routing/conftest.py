"""Fixtures of the routing tests: a data folder's settings and its catalog."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.lifecycle import open_catalog


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", routing_secrets={"weed": "unused:unused"})


@pytest.fixture
def catalog(settings: Settings) -> Iterator[CatalogReader]:
    """The catalog, opened before the test ingests: each test refreshes it."""
    reader = open_catalog(settings)
    yield reader
    reader.close()
