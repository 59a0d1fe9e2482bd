"""Fixtures for catalog tests: data folders and landing helpers."""

from pathlib import Path

import pydicom
import pydicom.data
import pytest

from vannah_pipelines.catalog.ingest import IngestPaths
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts


@pytest.fixture
def paths(tmp_path: Path) -> IngestPaths:
    return IngestPaths(
        tmp_path / "landing", tmp_path / "hot", tmp_path / "catalog", tmp_path / "quarantine"
    )


def land(paths: IngestPaths, blobs: list[tuple[str, bytes]], source: str = "dimse") -> str:
    """Land (sop_uid, bytes) pairs as one sealed batch; returns its id."""
    batch = LandingZone(paths.landing_dir).open_batch(source)
    for uid, data in blobs:
        batch.write_instance(
            data,
            ReceiveFacts(
                uid,
                "1.2.840.10008.5.1.4.1.1.2",
                "1.2.840.10008.1.2.1",
                source,
                calling_ae="TESTSCU",
                peer="127.0.0.1:1",
            ),
        )
    sealed = batch.seal()
    assert sealed is not None
    return sealed.batch_id


def pydicom_test_files() -> list[Path]:
    """pydicom's bundled test files that carry the four UIDs an archive needs."""
    found = []
    # The files pydicom ships (get_testdata_files() would also try to download more).
    for name in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True, force=True)
        except Exception:
            continue
        if all(
            ds.get(k)
            for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        ):
            found.append(Path(name))
    return sorted(found)


def poisoned_instance(**kwargs: object) -> tuple[str, bytes]:
    """A Part-10 CT instance whose Rows (US) is 3 bytes long: acknowledged by a receiver
    that does not parse, then pydicom raises BytesLengthException reading it."""
    from vannah_pipelines.dicom.synthetic import make_instance, to_part10

    ds = make_instance("CT", rows=16, columns=16, **kwargs)  # type: ignore[arg-type]
    data = to_part10(ds)
    rows = b"\x28\x00\x10\x00US\x02\x00\x10\x00"  # (0028,0010) US, length 2, value 16
    assert data.count(rows) == 1
    return str(ds.SOPInstanceUID), data.replace(rows, b"\x28\x00\x10\x00US\x03\x00\x10\x00\x00")
