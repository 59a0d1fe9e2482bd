"""Catalog writer: durable day folders, atomic batch files."""

from datetime import date
from pathlib import Path

from vannah_pipelines.catalog.schema import QUARANTINE_SCHEMA
from vannah_pipelines.catalog.writer import CatalogWriter


def test_write_batch_makes_a_new_day_folder_durable(
    tmp_path: Path, synced_dirs: list[Path]
) -> None:
    writer = CatalogWriter(tmp_path / "catalog")
    writer.ensure()
    synced = synced_dirs
    synced.clear()
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
