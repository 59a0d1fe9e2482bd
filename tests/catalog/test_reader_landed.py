"""The services' reader answers landed instances at once, follows them through sealing and
ingest without a gap, and lets a landed re-send win like an indexed one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vannah_pipelines.catalog.compaction import compact, ensure_catalog
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.landed import LandedIndex
from vannah_pipelines.catalog.lookup import iter_headers
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts


def _write(batch: Any, ds: Any) -> None:
    batch.write_instance(
        to_part10(ds),
        ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "dimse"),
    )


def _state(reader: CatalogReader, study: str) -> tuple[Any, ...]:
    reader.refresh_landed()
    rows = reader.query(
        "SELECT sop_instance_uid, tier, storage_key, checksum FROM instances "
        "WHERE study_instance_uid = ? ORDER BY 1",
        [study],
    )
    counts = reader.query(
        "SELECT number_of_study_related_instances FROM studies WHERE study_instance_uid = ?",
        [study],
    )
    return rows, counts[0][0] if counts else 0


def test_landed_instances_follow_seal_and_ingest_without_a_gap(paths: IngestPaths) -> None:
    ensure_catalog(paths.catalog_dir)
    zone = LandingZone(paths.landing_dir)
    zone.ensure()
    reader = CatalogReader(paths.catalog_dir, landed=LandedIndex(paths.landing_dir, 1000))
    first = make_instance("CT", rows=8, columns=8)
    study = str(first.StudyInstanceUID)
    datasets = [first] + [
        make_instance("CT", rows=8, columns=8, study_uid=study, instance_number=i, seed=i)
        for i in (2, 3)
    ]
    batch = zone.open_batch("dimse")
    for n, ds in enumerate(datasets, 1):
        _write(batch, ds)
        rows, count = _state(reader, study)
        assert len(rows) == count == n  # each one as soon as it is written
    assert {r[1] for r in rows} == {"landing"}
    assert all(r[2].startswith("open/") for r in rows)
    headers = [h for _, h in iter_headers(reader, study)]
    assert len(headers) == 3 and all('"00080018"' in h for h in headers)

    sealed = batch.seal()
    assert sealed is not None
    rows, count = _state(reader, study)
    assert count == 3 and all(r[2].startswith(f"sealed/{sealed.batch_id}/") for r in rows)

    ingest_batches(paths, [sealed.batch_id])  # indexed, and the sealed batch removed
    rows, count = _state(reader, study)
    assert count == 3 and {r[1] for r in rows} == {"hot"}

    # A re-send of one instance with other bytes, landed: it wins, and nothing doubles.
    resent = make_instance(
        "CT",
        rows=8,
        columns=8,
        study_uid=study,
        seed=77,
        SOPInstanceUID=first.SOPInstanceUID,
        SeriesInstanceUID=first.SeriesInstanceUID,
    )
    again = zone.open_batch("dimse")
    _write(again, resent)
    rows, count = _state(reader, study)
    assert count == 3
    winner = next(r for r in rows if r[0] == str(first.SOPInstanceUID))
    assert winner[1] == "landing"
    again_sealed = again.seal()
    assert again_sealed is not None
    ingest_batches(paths, [again_sealed.batch_id])
    compact(paths.catalog_dir)
    reader.refresh()
    rows, count = _state(reader, study)
    assert count == 3 and {r[1] for r in rows} == {"hot"}
    assert next(r for r in rows if r[0] == str(first.SOPInstanceUID))[3] == winner[3]


def test_a_reader_without_the_landed_index_waits_for_ingest(tmp_path: Path) -> None:
    """The overlay is what answers before ingest: without it, nothing does."""
    paths = IngestPaths(tmp_path / "l", tmp_path / "h", tmp_path / "c", tmp_path / "q")
    ensure_catalog(paths.catalog_dir)
    zone = LandingZone(paths.landing_dir)
    zone.ensure()
    batch = zone.open_batch("dimse")
    ds = make_instance("MR", rows=8, columns=8)
    _write(batch, ds)
    reader = CatalogReader(paths.catalog_dir)
    assert reader.query("SELECT count(*) FROM instances")[0][0] == 0
