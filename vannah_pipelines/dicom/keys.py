"""Query/retrieve levels and the attributes the catalog can match and return at each one."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from vannah_pipelines.catalog.schema import DICOM_COLUMNS


class Level(StrEnum):
    """PS3.4 C.3 query/retrieve levels (QIDO-RS uses STUDY, SERIES and IMAGE)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class UnknownAttributeError(ValueError):
    """A keyword or tag that is not a DICOM attribute, or one this level cannot match."""


@dataclass(frozen=True)
class Attribute:
    """A queryable attribute: its keyword, tag (8 hex digits), VR and catalog column."""

    keyword: str
    tag: str
    vr: str
    column: str | None  # None: read from header_json (instance level only)
    level: Level
    multi_valued: bool = False  # stored joined with '\\' (ModalitiesInStudy, ImageType…)


def _attribute(keyword: str, column: str | None, level: Level, multi: bool = False) -> Attribute:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Attribute(keyword, f"{tag:08X}", dictionary_VR(tag), column, level, multi)


_LEVELS = {
    "PATIENT": Level.PATIENT,
    "STUDY": Level.STUDY,
    "SERIES": Level.SERIES,
    "IMAGE": Level.IMAGE,
}
_MULTI = {"ImageType", "OtherPatientIDs", "ModalitiesInStudy"}

ATTRIBUTES: dict[str, Attribute] = {
    c.keyword: _attribute(c.keyword, c.name, _LEVELS[c.level], c.keyword in _MULTI)
    for c in DICOM_COLUMNS
    if c.keyword is not None
}
ATTRIBUTES.update(
    {
        "ModalitiesInStudy": _attribute(
            "ModalitiesInStudy", "modalities_in_study", Level.STUDY, True
        ),
        "NumberOfStudyRelatedSeries": _attribute(
            "NumberOfStudyRelatedSeries", "number_of_study_related_series", Level.STUDY
        ),
        "NumberOfStudyRelatedInstances": _attribute(
            "NumberOfStudyRelatedInstances", "number_of_study_related_instances", Level.STUDY
        ),
        "NumberOfSeriesRelatedInstances": _attribute(
            "NumberOfSeriesRelatedInstances", "number_of_series_related_instances", Level.SERIES
        ),
        "InstanceAvailability": _attribute(
            "InstanceAvailability", "instance_availability", Level.STUDY
        ),
        "NumberOfPatientRelatedStudies": _attribute(
            "NumberOfPatientRelatedStudies", "number_of_patient_related_studies", Level.PATIENT
        ),
        "NumberOfPatientRelatedSeries": _attribute(
            "NumberOfPatientRelatedSeries", "number_of_patient_related_series", Level.PATIENT
        ),
        "NumberOfPatientRelatedInstances": _attribute(
            "NumberOfPatientRelatedInstances", "number_of_patient_related_instances", Level.PATIENT
        ),
    }
)

# The attributes each level can match (a level sees the levels above it).
_ORDER = [Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE]
# Derived attributes that exist only at their own level.
_OWN_LEVEL_ONLY = {
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
}


def resolve(key: str) -> tuple[str, str, str]:
    """Resolve a keyword or an 8-hex-digit tag to (keyword, tag, VR).

    >>> resolve("PatientID"), resolve("00100020")
    (('PatientID', '00100020', 'LO'), ('PatientID', '00100020', 'LO'))

    Raises
    ------
    UnknownAttributeError
        If `key` is neither a known keyword nor a tag of the data dictionary.
    """
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        number = int(key, 16)
        keyword = keyword_for_tag(number)
        if not keyword:
            raise UnknownAttributeError(f"unknown tag {key}")
        return keyword, key.upper(), dictionary_VR(number)
    found = tag_for_keyword(key)
    if found is None:
        raise UnknownAttributeError(f"unknown attribute {key!r}")
    return key, f"{found:08X}", dictionary_VR(found)


def attribute_at(key: str, level: Level) -> Attribute:
    """The attribute `key` as matched or returned at `level`.

    Catalog columns of this or a higher level match directly; at IMAGE level any other
    dictionary attribute is read from the instance header (header_json).

    Raises
    ------
    UnknownAttributeError
        For an unknown attribute, or one this level does not hold.
    """
    keyword, tag, vr = resolve(key)
    known = ATTRIBUTES.get(keyword)
    if known is not None:
        if keyword == "InstanceAvailability":
            return Attribute(keyword, tag, vr, known.column, level)
        if keyword in _OWN_LEVEL_ONLY and known.level != level:
            raise UnknownAttributeError(f"{keyword} is a {known.level} level attribute")
        if _ORDER.index(known.level) <= _ORDER.index(level):
            return known
        if level != Level.IMAGE:
            raise UnknownAttributeError(f"{keyword} is not held at {level} level")
    if level != Level.IMAGE:
        raise UnknownAttributeError(f"{keyword} is not matched at {level} level")
    return Attribute(keyword, tag, vr, None, Level.IMAGE)
