"""Find stored instances by UID: what WADO-RS / WADO-URI need to open and describe them.

Every UID is validated (PS3.5 9.1) before it reaches SQL, and every value is bound, never
formatted into the statement.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.keys import Level
from vannah_pipelines.dicom.uids import is_uid, require_uid

_COLUMNS = (
    "study_instance_uid, series_instance_uid, sop_instance_uid, sop_class_uid, storage_key, "
    "tier, transfer_syntax_uid, number_of_frames, rows, columns, size_bytes, instance_number, "
    "checksum"
)
_ORDER = (
    "ORDER BY series_number NULLS LAST, series_instance_uid, instance_number NULLS LAST, "
    "sop_instance_uid"
)


@dataclass(frozen=True)
class StoredInstance:
    """One instance as the catalog knows it: where its bytes are and how they are encoded."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    storage_key: str
    tier: str
    transfer_syntax_uid: str
    number_of_frames: int | None
    rows: int | None
    columns: int | None
    size_bytes: int
    instance_number: int | None
    checksum: str = ""  # SHA-256 of the stored bytes

    @property
    def frames(self) -> int:
        """How many frames the instance holds (0: no image)."""
        if self.rows is None:
            return 0
        return self.number_of_frames if self.number_of_frames and self.number_of_frames > 0 else 1


def _instance(row: tuple[Any, ...]) -> StoredInstance:
    return StoredInstance(
        study_instance_uid=row[0],
        series_instance_uid=row[1],
        sop_instance_uid=row[2],
        sop_class_uid=row[3] or "",
        storage_key=row[4],
        tier=row[5] or "",
        transfer_syntax_uid=row[6] or "",
        number_of_frames=row[7],
        rows=row[8],
        columns=row[9],
        size_bytes=row[10] or 0,
        instance_number=row[11],
        checksum=row[12] or "",
    )


def _where(
    study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> tuple[str, list[str]]:
    clauses = ["study_instance_uid = ?"]
    params = [require_uid(study_uid, "StudyInstanceUID")]
    if series_uid is not None:
        clauses.append("series_instance_uid = ?")
        params.append(require_uid(series_uid, "SeriesInstanceUID"))
    if sop_uid is not None:
        clauses.append("sop_instance_uid = ?")
        params.append(require_uid(sop_uid, "SOPInstanceUID"))
    return " AND ".join(clauses), params


def find_instances(
    reader: CatalogReader,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[StoredInstance]:
    """The instances of a study, of one of its series, or the one instance named, in
    series / instance number order (empty if none matches).

    Raises
    ------
    UnsafeUidError
        If a UID given is not a PS3.5 UID.
    """
    where, params = _where(study_uid, series_uid, sop_uid)
    rows = reader.query(f"SELECT {_COLUMNS} FROM instances WHERE {where} {_ORDER}", params)
    return [_instance(r) for r in rows]


def find_instance(
    reader: CatalogReader, study_uid: str, series_uid: str, sop_uid: str
) -> StoredInstance | None:
    """The one instance named by its three UIDs, or None."""
    found = find_instances(reader, study_uid, series_uid, sop_uid)
    return found[0] if found else None


def iter_headers(
    reader: CatalogReader,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    page: int = 500,
) -> Iterator[tuple[StoredInstance, str]]:
    """(instance, header_json) pairs of a study / series / instance, `page` rows at a time
    (so a study of any size never sits in memory whole)."""
    where, params = _where(study_uid, series_uid, sop_uid)
    sql = (
        f"SELECT {_COLUMNS}, source_file, checksum FROM instances WHERE {where} {_ORDER} "
        "LIMIT ? OFFSET ?"
    )
    offset = 0
    while True:
        # One row more than a page says whether another page follows (no empty last query).
        rows = reader.query(sql, [*params, page + 1, offset])
        more = len(rows) > page
        rows = rows[:page]
        # Headers live in the catalog's Parquet files, not in the reader's memory.
        headers = reader.headers([(r[-2], r[2], r[-1], r[0]) for r in rows])
        for row in rows:
            yield _instance(row), headers.get((row[2], row[-1]), "{}")
        if not more:
            return
        offset += page


def instance_header(
    reader: CatalogReader, study_uid: str, series_uid: str, sop_uid: str
) -> tuple[StoredInstance, str] | None:
    """The instance and its header JSON, or None."""
    return next(iter_headers(reader, study_uid, series_uid, sop_uid, page=1), None)


_UNIQUE_COLUMNS = {
    Level.PATIENT: "patient_id",
    Level.STUDY: "study_instance_uid",
    Level.SERIES: "series_instance_uid",
    Level.IMAGE: "sop_instance_uid",
}


def representative_headers(
    reader: CatalogReader, level: Level, keys: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The DICOM JSON header of one instance for each unique key value in `keys` at `level`:
    at IMAGE level the instance itself, above it the lowest-numbered instance of the
    patient, study or series (whose attributes of that level all its instances share).

    Values are bound as parameters; `level` picks a column name from a fixed table.
    """
    if not keys:
        return {}
    column = _UNIQUE_COLUMNS[level]
    rows = reader.query(
        f"SELECT {column}, source_file, sop_instance_uid, checksum, study_instance_uid "
        "FROM instances "
        f"WHERE {column} IN (SELECT unnest(?)) "
        f"QUALIFY row_number() OVER (PARTITION BY {column} "
        "ORDER BY instance_number NULLS LAST, sop_instance_uid) = 1",
        [sorted(set(keys))],
    )
    headers = reader.headers([(r[1], r[2], r[3], r[4]) for r in rows])
    return {r[0]: json.loads(headers.get((r[2], r[3])) or "{}") for r in rows}


def study_patients(reader: CatalogReader, study_uids: Sequence[str]) -> dict[str, str]:
    """Patient ID (``""`` if absent) of each study of `study_uids` the catalog holds;
    studies it does not hold (or whose UID is not valid) are left out."""
    wanted = [uid for uid in study_uids if is_uid(uid)]
    if not wanted:
        return {}
    rows = reader.query(
        "SELECT study_instance_uid, patient_id FROM studies "
        "WHERE list_contains(?, study_instance_uid)",
        [wanted],
    )
    return {str(r[0]): str(r[1] or "") for r in rows}
