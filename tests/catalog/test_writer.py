"""Catalog writer: durable day folders, atomic batch files."""

from datetime import date
from pathlib import Path

import pytest

from vannah_pipelines.catalog.schema import QUARANTINE_SCHEMA
from vannah_pipelines.catalog.writer import CatalogWriter
from vannah_pipelines.landing import layout


def test_write_batch_makes_a_new_day_folder_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = CatalogWriter(tmp_path / "catalog")
    writer.ensure()
    synced: list[Path] = []
    real = layout.fsync_dir

    def spy(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(layout, "fsync_dir", spy)
    day = date(2026, 3, 4)
    path = writer.write_batch(
        "quarantine", day, "20260304T000000000000-dimse-1-0", QUARANTINE_SCHEMA.empty_table()
    )
    table_dir = tmp_path / "catalog" / "quarantine"
    assert path.parent == table_dir / "day=2026-03-04"
    assert synced == [table_dir, path.parent]  # the new folder's entry, then the file's
    synced.clear()
    writer.write_batch(
        "quarantine", day, "20260304T000000000000-dimse-1-1", QUARANTINE_SCHEMA.empty_table()
    )
    assert synced == [path.parent]  # an existing day: the file's entry only
