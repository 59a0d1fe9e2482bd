"""A full disk under the catalog: ingest fails without quarantining good files, keeps the
batch in the landing zone, and the rerun indexes everything once space returns.

The catalog lives on a real, small tmpfs (``mount -t tmpfs``) filled to the last byte, so
the write fails with a real ENOSPC. Where mounting is refused (not root, no CAP_SYS_ADMIN)
the test says so and falls back to an in-process simulation: the catalog's atomic write
raises ENOSPC.
"""

import contextlib
import errno
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from tests.catalog.conftest import land, poisoned_instance
from vannah_pipelines.catalog import writer as writer_module
from vannah_pipelines.catalog.compaction import ensure_catalog, publish
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.defs.catalog.assets import instance_index
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.landing.space import is_disk_full


class FullDisk:
    """Fills the catalog's file system (or simulates it), and frees it again."""

    def __init__(self, root: Path, mounted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.mounted = mounted
        self.monkeypatch = monkeypatch
        self.filler = root / "filler"

    def fill(self) -> None:
        if not self.mounted:  # simulation: every catalog write hits ENOSPC
            real = writer_module.write_atomic

            def full(path: Path, data: object, **kwargs: object) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

            self.monkeypatch.setattr(writer_module, "write_atomic", full)
            self._real = real
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            chunk = b"\0" * 65536
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0")  # the last bytes
        finally:
            os.close(fd)
        assert os.statvfs(self.root).f_bavail == 0

    def free(self) -> None:
        if not self.mounted:
            self.monkeypatch.setattr(writer_module, "write_atomic", self._real)
            return
        self.filler.unlink()


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FullDisk]:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(catalog)],
        capture_output=True,
        text=True,
    )
    mounted = mount.returncode == 0
    if not mounted:
        warnings.warn(
            f"tmpfs mount refused ({mount.stderr.strip()}): simulating ENOSPC in-process",
            stacklevel=1,
        )
    try:
        yield FullDisk(catalog, mounted, monkeypatch)
    finally:
        if mounted:
            subprocess.run(["umount", str(catalog)], check=False)
            if os.path.ismount(catalog):
                subprocess.run(["umount", "-l", str(catalog)], check=False)


def _paths(tmp_path: Path) -> IngestPaths:
    return IngestPaths(
        tmp_path / "landing", tmp_path / "hot", tmp_path / "catalog", tmp_path / "quarantine"
    )


def _blobs(n: int) -> list[tuple[str, bytes]]:
    out = []
    for _ in range(n):
        ds = make_instance("CT", rows=16, columns=16)
        out.append((ds.SOPInstanceUID, to_part10(ds)))
    return out


def test_ingest_on_a_full_catalog_disk_fails_then_indexes_everything_when_space_returns(
    tmp_path: Path, full_disk: FullDisk
) -> None:
    paths = _paths(tmp_path)
    assert ingest_batches(paths, [land(paths, _blobs(2))]).instances == 2
    good = _blobs(3)
    poison_uid, poison = poisoned_instance()
    batch_id = land(paths, [*good[:1], (poison_uid, poison), *good[1:]])
    full_disk.fill()
    with pytest.raises(OSError) as caught:
        ingest_batches(paths, [batch_id])
    assert is_disk_full(caught.value)
    # Nothing lost, no good file quarantined, no temp file left on the full disk.
    assert len(LandingZone(paths.landing_dir).batch(batch_id).instances()) == 4
    quarantined = {p.name for p in paths.quarantine_dir.rglob("*.dcm")}
    assert quarantined <= {f"{poison_uid}.dcm"}
    assert not list(paths.catalog_dir.rglob(".tmp-*"))
    full_disk.free()
    result = ingest_batches(paths, [batch_id])
    assert (result.instances, result.quarantined) == (3, 1)
    reader = CatalogReader(paths.catalog_dir)
    assert reader.query("SELECT count(*) FROM instances") == [(5,)]
    assert reader.query("SELECT sop_instance_uid FROM quarantine") == [(poison_uid,)]
    assert not LandingZone(paths.landing_dir).sealed_batches()


def test_ingest_run_on_a_full_disk_is_tagged_for_the_sensor(
    tmp_path: Path, full_disk: FullDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Dagster run fails with a Failure that says so, and the run carries the tag the
    sensor reads to retry it when space returns, without counting an attempt."""
    monkeypatch.setenv("VANNAH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VANNAH_FREE_SPACE_RESERVE_MB", "0")
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    paths = _paths(tmp_path)
    ingest_batches(paths, [])  # the catalog exists before the disk fills
    batch_id = land(paths, _blobs(2))
    day = f"{batch_id[:4]}-{batch_id[4:6]}-{batch_id[6:8]}"
    full_disk.fill()
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [instance_index],
            instance=instance,
            partition_key=day,
            resources={"archive": ArchiveResource()},
            run_config=dg.RunConfig(ops={"instance_index": {"config": {"batch_ids": [batch_id]}}}),
            raise_on_error=False,
        )
        assert not result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.tags.get("vannah/failure") == "disk_full"
    assert len(LandingZone(paths.landing_dir).batch(batch_id).instances()) == 2
    assert not list(paths.quarantine_dir.rglob("*.dcm"))


def test_publishing_the_catalog_on_a_full_disk_is_a_disk_full_error(
    tmp_path: Path, full_disk: FullDisk
) -> None:
    """Publishing a first generation (the serving database DuckDB writes) on a full disk is
    reported as ENOSPC (so the sensor waits for space) and leaves no temp file."""
    catalog = tmp_path / "catalog"
    ensure_catalog(catalog)
    if not full_disk.mounted:
        pytest.skip("needs the real tmpfs: DuckDB writes its file itself")
    (catalog / "catalog.duckdb").unlink()
    (catalog / "manifest.json").unlink()
    shutil.rmtree(catalog / "serving")
    full_disk.fill()
    with pytest.raises(OSError) as caught:
        publish(catalog)
    assert is_disk_full(caught.value)
    assert not list(catalog.glob(".catalog.duckdb.*"))
    assert not list((catalog / "serving").glob(".tmp-*"))
    full_disk.free()
    assert publish(catalog).exists()
