"""CatalogHolder: the one way a service holds the catalog (lazy load, throttled refresh, close)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from tests.catalog.conftest import land
from vannah_pipelines.catalog import holder as holder_module
from vannah_pipelines.catalog import reader as reader_module
from vannah_pipelines.catalog.holder import CatalogHolder
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.writer import CatalogWriter
from vannah_pipelines.dicom.synthetic import make_instance, to_part10


class FakeReader:
    """Counts what the holder does with its reader."""

    opened: ClassVar[list[FakeReader]] = []
    open_delay = 0.0

    def __init__(self, root: Path, **kwargs: object) -> None:
        time.sleep(self.open_delay)
        self.root = root
        self.refreshes = 0
        self.closed = False
        self.gate: threading.Event | None = None
        self.refreshing = threading.Event()
        FakeReader.opened.append(self)

    def refresh_landed(self) -> bool:
        return False

    def refresh(self) -> int:
        self.refreshing.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.refreshes += 1
        return 0

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Clock:
    FakeReader.opened = []
    FakeReader.open_delay = 0.0
    monkeypatch.setattr(reader_module, "CatalogReader", FakeReader)
    clock = Clock()
    monkeypatch.setattr(holder_module.time, "monotonic", clock)
    return clock


def test_holder_loads_on_first_get_not_before(fake: Clock, tmp_path: Path) -> None:
    holder = CatalogHolder(tmp_path, 0.5)
    assert FakeReader.opened == []
    reader = holder.get()
    assert FakeReader.opened == [reader]
    assert reader.refreshes == 0  # a fresh load is up to date
    assert holder.get() is reader
    assert len(FakeReader.opened) == 1


def test_holder_refreshes_at_most_every_interval(fake: Clock, tmp_path: Path) -> None:
    holder = CatalogHolder(tmp_path, 0.5)
    reader = holder.get()
    fake.now += 0.3
    holder.get()
    assert reader.refreshes == 0
    fake.now += 0.2
    holder.get()
    assert reader.refreshes == 1
    fake.now += 0.4
    holder.get()
    holder.get()
    assert reader.refreshes == 1
    fake.now += 0.1
    holder.get()
    assert reader.refreshes == 2


def test_holder_with_zero_interval_refreshes_every_get(fake: Clock, tmp_path: Path) -> None:
    holder = CatalogHolder(tmp_path, 0)
    reader = holder.get()
    for _ in range(3):
        holder.get()
    assert reader.refreshes == 3


def test_holder_load_opens_now_and_first_get_refreshes(fake: Clock, tmp_path: Path) -> None:
    holder = CatalogHolder(tmp_path, 0.5)
    reader = holder.load()
    assert FakeReader.opened == [reader]
    assert holder.load() is reader
    assert holder.get() is reader
    assert reader.refreshes == 1  # what was published between start-up and the request
    holder.get()
    assert reader.refreshes == 1


def test_holder_close_closes_and_next_get_reopens(fake: Clock, tmp_path: Path) -> None:
    holder = CatalogHolder(tmp_path, 0.5)
    holder.close()  # nothing open: nothing to do
    first = holder.get()
    holder.close()
    assert first.closed
    second = holder.get()
    assert second is not first and not second.closed
    assert len(FakeReader.opened) == 2


def test_holder_first_load_happens_once_under_concurrency(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    FakeReader.opened = []
    FakeReader.open_delay = 0.05
    monkeypatch.setattr(reader_module, "CatalogReader", FakeReader)
    holder = CatalogHolder(tmp_path, 60)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(holder.get())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(FakeReader.opened) == 1
    assert got == [FakeReader.opened[0]] * 8


def test_holder_answers_from_current_copy_while_another_thread_refreshes(
    fake: Clock, tmp_path: Path
) -> None:
    holder = CatalogHolder(tmp_path, 0.5)
    reader = holder.get()
    reader.gate = threading.Event()
    fake.now += 1
    refresher = threading.Thread(target=holder.get)
    refresher.start()
    assert reader.refreshing.wait(10)
    started = time.perf_counter()
    assert holder.get() is reader  # does not wait for the refresh in progress
    assert time.perf_counter() - started < 1
    reader.gate.set()
    refresher.join()
    assert reader.refreshes == 1


def test_holder_sees_batches_published_after_load(paths: IngestPaths) -> None:
    CatalogWriter(paths.catalog_dir).ensure()
    holder = CatalogHolder(paths.catalog_dir, 0)
    try:
        assert holder.get().query("SELECT count(*) FROM instances") == [(0,)]
        ds = make_instance("CT", rows=16, columns=16)
        ingest_batches(paths, [land(paths, [(ds.SOPInstanceUID, to_part10(ds))])])
        rows = holder.get().query("SELECT sop_instance_uid FROM instances")
        assert rows == [(ds.SOPInstanceUID,)]
    finally:
        holder.close()
