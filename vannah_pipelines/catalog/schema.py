"""Catalog schemas: column names are snake_case DICOM keywords; see docs/catalog.md."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    """A catalog column and the DICOM keyword it is read from (None: archive facts)."""

    name: str
    type: pa.DataType
    keyword: str | None
    level: str  # PATIENT | STUDY | SERIES | IMAGE | ARCHIVE


def snake(keyword: str) -> str:
    """DICOM keyword -> catalog column name.

    >>> snake("SOPInstanceUID"), snake("PatientBirthDate"), snake("OtherPatientIDs")
    ('sop_instance_uid', 'patient_birth_date', 'other_patient_ids')
    """
    s = re.sub(r"IDs\b", "Ids", keyword)
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", s)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


_STRING = pa.string()


def _dicom(level: str, keywords: str, type_: pa.DataType = _STRING) -> list[Column]:
    return [Column(snake(k), type_, k, level) for k in keywords.split()]


# Every attribute QIDO-RS (PS3.18 table 10.6.1-5) and C-FIND (PS3.4 C.6) match or return.
DICOM_COLUMNS: list[Column] = [
    *_dicom(
        "PATIENT",
        "PatientID PatientName PatientBirthDate PatientSex IssuerOfPatientID OtherPatientIDs",
    ),
    *_dicom(
        "STUDY",
        "StudyInstanceUID StudyDate StudyTime AccessionNumber "
        "ReferringPhysicianName StudyDescription StudyID",
    ),
    *_dicom(
        "SERIES",
        "SeriesInstanceUID Modality SeriesDescription BodyPartExamined "
        "SeriesDate SeriesTime PerformedProcedureStepStartDate "
        "PerformedProcedureStepStartTime Laterality StationName InstitutionName "
        "Manufacturer ManufacturerModelName",
    ),
    *_dicom("SERIES", "SeriesNumber", pa.int32()),
    *_dicom(
        "IMAGE",
        "SOPInstanceUID SOPClassUID ContentDate ContentTime AcquisitionDate "
        "AcquisitionTime ImageType PhotometricInterpretation SpecificCharacterSet",
    ),
    *_dicom("IMAGE", "InstanceNumber NumberOfFrames Rows Columns BitsAllocated", pa.int32()),
]

ARCHIVE_COLUMNS: list[Column] = [
    Column("transfer_syntax_uid", pa.string(), None, "ARCHIVE"),
    Column("size_bytes", pa.int64(), None, "ARCHIVE"),
    Column("checksum", pa.string(), None, "ARCHIVE"),  # sha256 of the stored file, hex
    Column("tier", pa.string(), None, "ARCHIVE"),
    Column("storage_key", pa.string(), None, "ARCHIVE"),
    Column("received_at", pa.timestamp("us", tz="UTC"), None, "ARCHIVE"),
    Column("indexed_at", pa.timestamp("us", tz="UTC"), None, "ARCHIVE"),
    Column("calling_ae", pa.string(), None, "ARCHIVE"),
    Column("called_ae", pa.string(), None, "ARCHIVE"),
    Column("peer", pa.string(), None, "ARCHIVE"),
    Column("source", pa.string(), None, "ARCHIVE"),  # dimse | stow | import
    Column("batch_id", pa.string(), None, "ARCHIVE"),
    Column("header_json", pa.string(), None, "ARCHIVE"),  # DICOM JSON, no bulk data
]

INSTANCE_COLUMNS = DICOM_COLUMNS + ARCHIVE_COLUMNS
INSTANCE_SCHEMA = pa.schema([pa.field(c.name, c.type) for c in INSTANCE_COLUMNS])

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("batch_id", pa.string()),
        pa.field("file_name", pa.string()),
        pa.field("quarantine_key", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("checksum", pa.string()),
        pa.field("sop_instance_uid", pa.string()),
        pa.field("calling_ae", pa.string()),
        pa.field("peer", pa.string()),
        pa.field("source", pa.string()),
        pa.field("received_at", pa.timestamp("us", tz="UTC")),
        pa.field("quarantined_at", pa.timestamp("us", tz="UTC")),
    ]
)

TABLES: dict[str, pa.Schema] = {"instances": INSTANCE_SCHEMA, "quarantine": QUARANTINE_SCHEMA}

STUDY_COLUMNS = [c.name for c in DICOM_COLUMNS if c.level in ("PATIENT", "STUDY")]
SERIES_COLUMNS = [c.name for c in DICOM_COLUMNS if c.level == "SERIES"]


# Re-sent instances: the latest received version of a SOP Instance UID is current.
LATEST_FIRST = "received_at DESC, indexed_at DESC, checksum"
# PS3.3 C.4.23.1.1 Instance Availability: cold (archive class) needs a restore first.
INSTANCE_AVAILABILITY = "CASE WHEN tier = 'cold' THEN 'NEARLINE' ELSE 'ONLINE' END"
_GROUP_AVAILABILITY = "CASE WHEN bool_or(tier = 'cold') THEN 'NEARLINE' ELSE 'ONLINE' END"
MIXED_TIER = "mixed"
# A series' or study's tier: the one tier all its current instances are in, else 'mixed'
# (new instances of a study already moved land hot; a move may be part-way).
# Landed instances (not indexed yet) are on their way to the hot tier: they count as hot.
_HOT_LIKE = "CASE WHEN tier = 'landing' THEN 'hot' ELSE tier END"
_GROUP_TIER = (
    f"CASE WHEN min({_HOT_LIKE}) = max({_HOT_LIKE}) THEN min({_HOT_LIKE}) ELSE '{MIXED_TIER}' END"
)


def current_select(source: str, where: str = "") -> str:
    """The current version of each SOP Instance UID in `source`, with its availability."""
    return (
        f"SELECT *, {INSTANCE_AVAILABILITY} AS instance_availability FROM {source} {where} "
        f"QUALIFY row_number() OVER (PARTITION BY sop_instance_uid ORDER BY {LATEST_FIRST}) = 1"
    )


def _latest(column: str, when: str, key: str) -> str:
    """The value of `column` in the group's latest row that has one (ties: the largest
    `key`): deterministic, whatever order the rows are read in."""
    return f"arg_max({column}, ({column} IS NOT NULL, {when}, {key})) AS {column}"


def series_select(source: str, where: str = "") -> str:
    """One row per series of the current instances in `source`, with derived attributes."""
    cols = [c for c in SERIES_COLUMNS if c != "series_instance_uid"] + [
        c for c in STUDY_COLUMNS if c != "study_instance_uid"
    ]
    values = ",\n  ".join(_latest(c, "received_at", "sop_instance_uid") for c in cols)
    return f"""SELECT
  series_instance_uid,
  {_latest("study_instance_uid", "received_at", "sop_instance_uid")},
  {values},
  count(*) AS number_of_series_related_instances,
  sum(size_bytes) AS size_bytes,
  {_GROUP_TIER} AS tier,
  {_GROUP_AVAILABILITY} AS instance_availability,
  max(received_at) AS last_received_at
FROM {source} {where} GROUP BY series_instance_uid"""


def study_select(source: str, where: str = "") -> str:
    """One row per study of the current instances in `source`, with derived attributes."""
    values = ",\n  ".join(
        _latest(c, "received_at", "sop_instance_uid")
        for c in STUDY_COLUMNS
        if c != "study_instance_uid"
    )
    return f"""SELECT
  study_instance_uid,
  {values},
  string_agg(DISTINCT modality, '\\' ORDER BY modality) AS modalities_in_study,
  count(DISTINCT series_instance_uid) AS number_of_study_related_series,
  count(*) AS number_of_study_related_instances,
  sum(size_bytes) AS size_bytes,
  {_GROUP_TIER} AS tier,
  coalesce(sum(size_bytes) FILTER (WHERE tier IN ('hot', 'landing')), 0) AS hot_bytes,
  coalesce(sum(size_bytes) FILTER (WHERE tier = 'warm'), 0) AS warm_bytes,
  coalesce(sum(size_bytes) FILTER (WHERE tier = 'cold'), 0) AS cold_bytes,
  {_GROUP_AVAILABILITY} AS instance_availability,
  max(received_at) AS last_received_at
FROM {source} {where} GROUP BY study_instance_uid"""


PATIENT_COLUMNS = [c.name for c in DICOM_COLUMNS if c.level == "PATIENT"]


def patient_select(source: str, where: str = "") -> str:
    """One row per Patient ID of the studies in `source` (PS3.4 C.6.1 patient level)."""
    values = ",\n  ".join(
        _latest(c, "last_received_at", "study_instance_uid")
        for c in PATIENT_COLUMNS
        if c != "patient_id"
    )
    return f"""SELECT
  patient_id,
  {values},
  count(*) AS number_of_patient_related_studies,
  sum(number_of_study_related_series) AS number_of_patient_related_series,
  sum(number_of_study_related_instances) AS number_of_patient_related_instances,
  {_GROUP_AVAILABILITY.replace("tier = 'cold'", "instance_availability = 'NEARLINE'")}
    AS instance_availability
FROM {source} {where} GROUP BY patient_id"""
