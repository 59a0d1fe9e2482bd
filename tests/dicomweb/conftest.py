"""Fixtures for DICOMweb tests: an archive built in tmp from synthetic studies and pydicom's
test files (landed, ingested, catalogued), a TestClient on it, and a real uvicorn server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pydicom.data
import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from dicomweb.app import create_app
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.settings import Settings, load_settings

LOCAL_URL = "http://localhost"
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"

# pydicom test files worth serving: multi-frame, compressed, big endian, no pixels.
PYDICOM_FILES = (
    "CT_small.dcm",  # explicit LE, 16-bit signed, rescale
    "MR_small_implicit.dcm",  # implicit LE
    "MR_small_bigendian.dcm",  # explicit BE
    "MR_small_RLE.dcm",  # RLE
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
    "SC_rgb_rle_2frame.dcm",  # RLE, 2 frames, RGB
    "examples_ybr_color.dcm",  # JPEG baseline, 30 frames
    "rtdose.dcm",  # implicit LE, 15 frames, 32-bit
    "JPGExtended.dcm",  # JPEG extended 12-bit
    "examples_palette.dcm",  # PALETTE COLOR
    "waveform_ecg.dcm",  # no pixels, bulk waveform data
)


@dataclass(frozen=True)
class Stored:
    """An instance as sent to the archive."""

    name: str
    study: str
    series: str
    sop: str
    data: bytes
    transfer_syntax: str


@dataclass
class Archive:
    settings: Settings
    instances: dict[str, Stored] = field(default_factory=dict)
    studies: dict[str, list[Stored]] = field(default_factory=dict)

    def hot_file(self, sop: str) -> bytes:
        """The stored file of `sop`, read straight from the hot tier via the catalog."""
        reader = CatalogReader(self.settings.catalog_dir)
        try:
            ((key,),) = reader.query(
                "SELECT storage_key FROM instances WHERE sop_instance_uid = ?", [sop]
            )
        finally:
            reader.close()
        return (self.settings.hot_dir / str(key)).read_bytes()

    def snapshot(self) -> dict[str, bytes]:
        """Every file of the data folder (to show a request changed nothing), but the audit
        trail, which gets a row per request by design."""
        root = self.settings.data_dir
        audit = self.settings.audit_dir
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_relative_to(audit)
        }


def land_and_ingest(settings: Settings, blobs: list[tuple[str, bytes]]) -> None:
    """Land (sop_uid, part10) pairs as one sealed batch and ingest it."""
    batch = LandingZone(settings.landing_dir).open_batch("import")
    for sop, data in blobs:
        batch.write_instance(
            data, ReceiveFacts(sop, "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1", "import")
        )
    sealed = batch.seal()
    assert sealed is not None
    paths = IngestPaths(
        settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
    )
    result = ingest_batches(paths, [sealed.batch_id])
    assert result.quarantined == 0, result.quarantine_reasons


def _renamed(path: Path, study: str) -> pydicom.Dataset:
    """A pydicom test file with fresh UIDs (several share theirs), pixel data untouched."""
    ds = pydicom.dcmread(path, force=True)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def build_archive(data_dir: Path) -> Archive:
    settings = load_settings(data_dir=data_dir)
    archive = Archive(settings)
    blobs: list[tuple[str, bytes]] = []

    def add(name: str, ds: pydicom.Dataset) -> None:
        data = to_part10(ds) if name.startswith("synthetic") else _save(ds)
        stored = Stored(
            name,
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPInstanceUID),
            data,
            str(ds.file_meta.TransferSyntaxUID),
        )
        archive.instances[name] = stored
        archive.studies.setdefault(stored.study, []).append(stored)
        blobs.append((stored.sop, data))

    ct_study, ct_series = generate_uid(), [generate_uid(), generate_uid()]
    for s, series in enumerate(ct_series, start=1):
        for i in range(1, 4):
            ds = make_instance(
                "CT",
                study_uid=ct_study,
                series_uid=series,
                series_number=s,
                instance_number=i,
                rows=64,
                columns=64,
            )
            add(f"synthetic-ct-{s}-{i}", ds)
    add("synthetic-us", make_instance("US", rows=48, columns=64))
    add(
        "synthetic-mono1",
        make_instance("CR", rows=32, columns=32, PhotometricInterpretation="MONOCHROME1"),
    )
    files_study = generate_uid()
    for name in PYDICOM_FILES:
        add(name.removesuffix(".dcm"), _renamed(TEST_FILES / name, files_study))
    land_and_ingest(settings, blobs)
    return archive


def _save(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    return build_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def client(archive: Archive) -> Iterator[TestClient]:
    # The service answers loopback Host names only by default (not TestClient's "testserver").
    with TestClient(create_app(archive.settings), base_url=LOCAL_URL) as test_client:
        yield test_client


@dataclass
class RunningServer:
    url: str
    server: uvicorn.Server


def start_server(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, int]:
    """uvicorn on 127.0.0.1:0 in a thread; returns it, the thread and the bound port."""
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, int(port)


@pytest.fixture(scope="module")
def live_url(archive: Archive) -> Iterator[str]:
    server, thread, port = start_server(archive.settings)
    try:
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
