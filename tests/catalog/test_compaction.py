"""Compaction: answers identical before and after, readers never see a half state."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pydicom
import pytest

from tests.catalog.conftest import land, pydicom_test_files
from vannah_pipelines.catalog.compaction import SERVING_SCHEMA, Manifest, compact, publish, verify
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.lookup import iter_headers
from vannah_pipelines.catalog.query import QuerySpec, run_query, run_query_json
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.catalog.writer import CATALOG_DB, CatalogWriter
from vannah_pipelines.dicom.keys import Level
from vannah_pipelines.dicom.synthetic import make_instance, to_part10

MODALITIES = ("CT", "MR", "US", "CR", "DX", "MG", "NM", "PT", "XA", "RF")


def _study(modality: str, n: int, patient: str, **kwargs: Any) -> list[tuple[str, bytes]]:
    first = make_instance(modality, rows=8, columns=8, patient_id=patient, **kwargs)
    blobs = [(str(first.SOPInstanceUID), to_part10(first))]
    for i in range(1, n):
        ds = make_instance(
            modality,
            rows=8,
            columns=8,
            patient_id=patient,
            study_uid=first.StudyInstanceUID,
            series_uid=first.SeriesInstanceUID if i % 2 else None,
            instance_number=i + 1,
            seed=i,
            **kwargs,
        )
        blobs.append((str(ds.SOPInstanceUID), to_part10(ds)))
    return blobs


def _reference(paths: IngestPaths, where: Path) -> CatalogReader:
    """A reader over a copy of the batch files alone: the catalog as it was before any
    compaction (every row from the overlay)."""
    if where.exists():
        shutil.rmtree(where)
    where.mkdir()
    for table in ("instances", "quarantine"):
        for path in (paths.catalog_dir / table).glob("day=*/*.parquet"):
            target = where / table / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return CatalogReader(where)


SPECS = [
    QuerySpec(Level.PATIENT, include_all=True),
    QuerySpec(Level.STUDY, include_all=True),
    QuerySpec(Level.STUDY, filters=(("ModalitiesInStudy", "CT"),), include_all=True),
    QuerySpec(Level.STUDY, filters=(("PatientName", "*"),), limit=3),
    QuerySpec(Level.STUDY, filters=(("PatientID", "VHC-C-1"),), include_all=True),
    QuerySpec(Level.SERIES, include_all=True),
    QuerySpec(Level.SERIES, filters=(("Modality", "MR"),)),
    QuerySpec(Level.IMAGE, include_all=True),
    QuerySpec(Level.IMAGE, filters=(("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"),)),
]


def answers(reader: CatalogReader) -> dict[str, Any]:
    """What QIDO-RS (JSON), C-FIND (the same engine) and WADO-RS metadata answer."""
    found: dict[str, Any] = {}
    for spec in SPECS:
        found[f"json {spec}"] = sorted(
            run_query_json(reader, spec).body.decode()[1:-1].split("},{")
        )
        found[f"find {spec}"] = sorted(str(r) for r in run_query(reader, spec).rows)
    studies = [r[0] for r in reader.query("SELECT study_instance_uid FROM studies ORDER BY 1")]
    for study in studies:
        found[f"metadata {study}"] = [
            (i.sop_instance_uid, i.size_bytes, i.tier, i.storage_key, header)
            for i, header in iter_headers(reader, study)
        ]
    found["quarantine"] = sorted(
        reader.query("SELECT quarantine_key, reason, sop_instance_uid FROM quarantine")
    )
    found["versions"] = sorted(
        reader.query("SELECT sop_instance_uid, checksum, batch_id FROM instance_versions")
    )
    return found


def same(found: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Equal answers; otherwise print what differs (pytest shows it with the failure)."""
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if a != b:
            extra = [x for x in (a or []) if x not in (b or [])][:3]
            missing = [x for x in (b or []) if x not in (a or [])][:3]
            print(f"DIFF {key[:120]}\n  only found: {extra}\n  only expected: {missing}")
    return found == expected


_COUNTED = ("instances", "series", "studies", "patients", "quarantine", "instance_versions")


def _counts(query: Callable[[str], list[tuple[Any, ...]]]) -> dict[str, Any]:
    """Row counts of every view, and each study's derived attributes."""
    return {view: query(f"SELECT count(*) FROM {view}") for view in _COUNTED} | {
        "distinct": query("SELECT count(DISTINCT sop_instance_uid) FROM instances"),
        "modalities": query(
            "SELECT study_instance_uid, modalities_in_study, "
            "number_of_study_related_instances FROM studies ORDER BY 1"
        ),
    }


def _researcher_counts(catalog: Path) -> dict[str, Any]:
    """What a researcher's read-only catalog.duckdb shows."""
    con = duckdb.connect(str(catalog / CATALOG_DB), read_only=True)
    try:
        return _counts(lambda sql: con.execute(sql).fetchall())
    finally:
        con.close()


def _reader_counts(reader: CatalogReader) -> dict[str, Any]:
    """What a service's reader shows."""
    return _counts(reader.query)


@pytest.fixture
def archive(paths: IngestPaths) -> IngestPaths:
    """pydicom's test files, a study of every modality, a re-send, a quarantined file,
    spread over two arrival days."""
    blobs = []
    for f in pydicom_test_files():
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        blobs.append((str(ds.SOPInstanceUID), f.read_bytes()))
    # pydicom's files share some SOP UIDs: those in both halves are re-sends.
    batches = [land(paths, blobs[:30]), land(paths, blobs[30:])]
    for n, modality in enumerate(MODALITIES):
        batches.append(land(paths, _study(modality, 3, f"VHC-C-{n % 3}")))
    batches.append(land(paths, [("1.2.826.0.1.3680043.99.1", b"not dicom" * 40)]))
    ingest_batches(paths, batches)
    # One arrival day earlier for half the batch files (the day is the file's partition).
    for path in sorted((paths.catalog_dir / "instances").glob("day=2*/*.parquet"))[::2]:
        target = paths.catalog_dir / "instances" / "day=2020-01-02" / path.name
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
    return paths


def _more(paths: IngestPaths) -> None:
    """New instances in an existing study, a re-send with new bytes, a new study."""
    reader = CatalogReader(paths.catalog_dir)
    study = reader.query(
        "SELECT study_instance_uid, series_instance_uid, sop_instance_uid FROM instances "
        "WHERE modality = 'CT' LIMIT 1"
    )[0]
    reader.close()
    extra = make_instance(
        "CT",
        rows=8,
        columns=8,
        patient_id="VHC-C-0",
        study_uid=study[0],
        series_uid=study[1],
        instance_number=9,
        seed=9,
    )
    resent = make_instance(
        "CT",
        rows=8,
        columns=8,
        patient_id="VHC-C-0",
        study_uid=study[0],
        series_uid=study[1],
        seed=77,
        SOPInstanceUID=study[2],
        SeriesDescription="re-sent",
    )
    ingest_batches(
        paths,
        [
            land(paths, [(str(extra.SOPInstanceUID), to_part10(extra))]),
            land(paths, [(study[2], to_part10(resent))]),
            land(paths, _study("MR", 2, "VHC-C-9")),
        ],
    )


def test_answers_identical_before_and_after_compaction(
    archive: IngestPaths, tmp_path: Path
) -> None:
    paths = archive
    catalog = paths.catalog_dir
    CatalogWriter(catalog).ensure()
    live = CatalogReader(catalog)  # opened before: follows the new generation on refresh
    before = answers(live)
    assert len(before) > 20 and any(v for k, v in before.items() if k.startswith("metadata"))
    researchers_before = _researcher_counts(catalog)

    result = compact(catalog)
    assert result.changed and result.generation == 2  # generation 1: the empty catalog
    assert result.rows["instances"] == before_versions(before)
    assert all(replaced == wrote for replaced, wrote in verify(catalog, result).values())
    assert result.files_after < result.files_before
    assert live.refresh() == 0 and live.generation == 2 and live.pending_files() == 0
    assert same(answers(live), before)
    fresh = CatalogReader(catalog)
    assert same(answers(fresh), before)
    publish(catalog)
    assert _researcher_counts(catalog) == researchers_before == _reader_counts(fresh)

    # More batches on top of the compacted generation: the overlay.
    _more(paths)
    live.refresh()
    expected = answers(_reference(paths, tmp_path / "ref1"))
    assert same(answers(live), expected)
    assert same(answers(CatalogReader(catalog)), expected)
    assert _researcher_counts(catalog) == _reader_counts(live)
    resent = live.query(
        "SELECT series_description FROM instances WHERE series_description = 're-sent'"
    )
    assert len(resent) == 1

    # Compact again, the earlier generation's files retired at once (no grace).
    second = compact(catalog)
    assert all(replaced == wrote for replaced, wrote in verify(catalog, second).values())
    third = compact(catalog, grace_seconds=0)
    assert third.deleted_files > 0 and not third.changed
    live.refresh()
    assert same(answers(live), expected)
    publish(catalog)
    assert _researcher_counts(catalog) == _reader_counts(live)
    assert not list((catalog / "instances").glob("day=2*/*.parquet"))  # batch files gone
    assert not (catalog / "instances" / "day=2020-01-02").exists()  # emptied old day: gone
    assert (catalog / "instances" / "day=1970-01-01" / "schema.parquet").exists()
    manifest = Manifest.load(catalog)
    assert not manifest.covered.get("instances") and manifest.serving
    on_disk = sorted(
        str(p.relative_to(catalog)) for p in (catalog / "compacted").rglob("*.parquet")
    )
    assert on_disk == sorted(manifest.files["instances"] + manifest.files["quarantine"])
    assert sorted(p.name for p in (catalog / "serving").iterdir()) == [Path(manifest.serving).name]


def before_versions(found: dict[str, Any]) -> int:
    return len(found["versions"])


def test_compaction_is_idempotent_and_a_crash_leaves_the_generation(
    archive: IngestPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = archive.catalog_dir
    reader = CatalogReader(catalog)
    before = answers(reader)
    generation = Manifest.load(catalog).generation
    from vannah_pipelines.catalog import compaction

    def crash(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("killed while writing the serving database")

    monkeypatch.setattr(compaction, "_write_serving", crash)
    with pytest.raises(RuntimeError):
        compact(catalog)
    assert Manifest.load(catalog).generation == generation
    assert not list((catalog / "serving").glob(".tmp-*"))
    reader.refresh()
    assert same(answers(reader), before)
    monkeypatch.undo()
    first = compact(catalog)
    assert first.changed
    again = compact(catalog)
    assert not again.changed and again.generation == first.generation
    reader.refresh()
    assert same(answers(reader), before)


def test_readers_query_while_ingest_and_compaction_write(paths: IngestPaths) -> None:
    """No error, no half state, no duplicate: counts only grow, one row per SOP UID."""
    catalog = paths.catalog_dir
    ingest_batches(paths, [land(paths, _study("CT", 4, "VHC-R-1"))])
    reader = CatalogReader(catalog)
    errors: list[BaseException] = []
    seen: list[tuple[int, int, int]] = []
    stop = threading.Event()

    def query() -> None:
        while not stop.is_set():
            try:
                reader.refresh()
                # One statement: one snapshot.
                rows, distinct, total = reader.query(
                    "SELECT (SELECT count(*) FROM instances), (SELECT count(DISTINCT "
                    "sop_instance_uid) FROM instances), (SELECT coalesce(sum("
                    "number_of_study_related_instances), 0) FROM studies)"
                )[0]
                seen.append((rows, distinct, int(total)))
            except BaseException as exc:  # any error at all fails the test
                errors.append(exc)
                return

    threads = [threading.Thread(target=query) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for round_ in range(6):
            ingest_batches(paths, [land(paths, _study("MR", 3, f"VHC-R-{round_}"))])
            compact(catalog, grace_seconds=0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert seen
    assert all(rows == distinct == total for rows, distinct, total in seen)
    reader.refresh()
    assert reader.query("SELECT count(*) FROM instances")[0][0] == 4 + 6 * 3


def _where(reader: CatalogReader, sop: str, study: str) -> tuple[Any, ...]:
    row = reader.query(
        "SELECT tier, storage_key, instance_availability FROM instances WHERE sop_instance_uid = ?",
        [sop],
    )
    series = reader.query(
        "SELECT instance_availability FROM series WHERE series_instance_uid "
        "= (SELECT series_instance_uid FROM instances WHERE sop_instance_uid "
        "= ?)",
        [sop],
    )
    studies = reader.query(
        "SELECT instance_availability, number_of_study_related_instances "
        "FROM studies WHERE study_instance_uid = ?",
        [study],
    )
    return (*row, *series, *studies)


@pytest.mark.parametrize("compacted", [False, True], ids=["overlay", "compacted"])
def test_one_location_append_moves_an_instance_for_the_services(
    paths: IngestPaths, compacted: bool
) -> None:
    """A state-change row switches where an instance lives in the services' reader (its
    instance, series and study rows), before and after compaction folds it in."""
    from vannah_pipelines.catalog.changes import append_change

    ingest_batches(paths, [land(paths, _study("CT", 3, "VHC-L-1"))])
    catalog = paths.catalog_dir
    if compacted:
        compact(catalog)
    reader = CatalogReader(catalog)
    sop, study, checksum = reader.query(
        "SELECT sop_instance_uid, study_instance_uid, checksum FROM instances LIMIT 1"
    )[0]
    assert _where(reader, sop, study)[0][0] == "hot"
    append_change(
        CatalogWriter(catalog),
        "instance_locations",
        [
            {
                "sop_instance_uid": sop,
                "checksum": checksum,
                "tier": "cold",
                "storage_key": f"glacier/{sop}",
            }
        ],
        changed_by="test",
    )
    reader.refresh()
    moved = (("cold", f"glacier/{sop}", "NEARLINE"), ("NEARLINE",), ("NEARLINE", 3))
    assert _where(reader, sop, study) == moved
    others = reader.query("SELECT DISTINCT tier FROM instances WHERE sop_instance_uid <> ?", [sop])
    assert others == [("hot",)]
    compact(catalog)
    reader.refresh()
    assert _where(reader, sop, study) == moved
    assert _where(CatalogReader(catalog), sop, study) == moved
    publish(catalog)
    con = duckdb.connect(str(catalog / CATALOG_DB), read_only=True)
    assert con.execute(
        "SELECT tier FROM instances WHERE sop_instance_uid = ?", [sop]
    ).fetchall() == [("cold",)]
    con.close()


def test_series_and_studies_derived_by_buckets_are_the_same(
    archive: IngestPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large archives derive series and studies a bucket of studies at a time (bounded
    memory): with buckets of a few instances the answers are those of one pass."""
    from vannah_pipelines.catalog import compaction

    expected = answers(_reference(archive, tmp_path / "ref"))
    monkeypatch.setattr(compaction, "_ROWS_PER_BUCKET", 7)
    compact(archive.catalog_dir)
    reader = CatalogReader(archive.catalog_dir)
    assert reader.pending_files() == 0
    assert same(answers(reader), expected)


def _downgrade(root: Path) -> None:
    """Make the current generation what the previous version wrote: studies without
    ``tier``, a manifest without ``schema``."""
    serving = Manifest.load(root).serving
    assert serving is not None
    con = duckdb.connect(str(root / serving))
    con.execute("ALTER TABLE compacted_studies DROP COLUMN tier")
    con.close()
    raw = json.loads((root / "manifest.json").read_text())
    del raw["schema"]
    (root / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(root).schema == 1


def _study_tiers(root: Path) -> dict[str, Any]:
    reader = CatalogReader(root)
    try:
        return dict(reader.query("SELECT modalities_in_study, tier FROM studies"))
    finally:
        reader.close()


def test_a_serving_database_of_an_older_layout_is_read_then_rebuilt(paths: IngestPaths) -> None:
    """A catalog compacted by the previous version is read as it is (the column it lacks
    reads NULL), and the next compaction rebuilds it even with no new batch."""
    root = paths.catalog_dir
    ingest_batches(paths, [land(paths, _study("CT", 2, "VHC-U-1"))])
    compact(root)
    generation = Manifest.load(root).generation
    assert Manifest.load(root).schema == SERVING_SCHEMA
    _downgrade(root)
    assert _study_tiers(root) == {"CT": None}
    compact(root)  # no new batch: rebuilt for the layout alone
    rebuilt = Manifest.load(root)
    assert (rebuilt.generation, rebuilt.schema) == (generation + 1, SERVING_SCHEMA)
    assert _study_tiers(root) == {"CT": "hot"}
    compact(root)
    assert Manifest.load(root).generation == generation + 1  # then nothing more to do
    # New studies in the overlay over an older serving database carry their tier.
    _downgrade(root)
    ingest_batches(paths, [land(paths, _study("MR", 1, "VHC-U-2"))])
    assert _study_tiers(root) == {"CT": None, "MR": "hot"}
