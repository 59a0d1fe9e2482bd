"""A scheduled procedure step: one MWL item (patient, order, one SPS item) plus its status.

The item is kept as a DICOM data set so that C-FIND can match and return any attribute a
source supplied (a DCMTK ``.wl`` file carries more than the REST model names).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from vannah_pipelines.dicom.uids import is_uid
from vannah_pipelines.worklist.errors import InvalidItemError


class StepStatus(StrEnum):
    """ScheduledProcedureStepStatus (0040,0020) defined terms (PS3.3 C.4.10), plus CANCELED."""

    SCHEDULED = "SCHEDULED"
    ARRIVED = "ARRIVED"
    READY = "READY"
    STARTED = "STARTED"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"
    CANCELED = "CANCELED"


# Steps in these states are never returned by C-FIND (docs/worklist.md, "What is returned").
CLOSED_STATUSES = frozenset({StepStatus.COMPLETED, StepStatus.DISCONTINUED, StepStatus.CANCELED})

SPS = "ScheduledProcedureStepSequence"

# snake_case field -> DICOM keyword, for the attributes the product promises (PRODUCT.md).
TOP_LEVEL_FIELDS: dict[str, str] = {
    "patient_name": "PatientName",
    "patient_id": "PatientID",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "accession_number": "AccessionNumber",
    "referring_physician_name": "ReferringPhysicianName",
    "requesting_physician": "RequestingPhysician",
    "requested_procedure_id": "RequestedProcedureID",
    "requested_procedure_description": "RequestedProcedureDescription",
    "requested_procedure_priority": "RequestedProcedurePriority",
    "study_instance_uid": "StudyInstanceUID",
    "study_description": "StudyDescription",
}
SPS_FIELDS: dict[str, str] = {
    "modality": "Modality",
    "scheduled_station_ae_title": "ScheduledStationAETitle",
    "scheduled_station_name": "ScheduledStationName",
    "scheduled_procedure_step_start_date": "ScheduledProcedureStepStartDate",
    "scheduled_procedure_step_start_time": "ScheduledProcedureStepStartTime",
    "scheduled_performing_physician_name": "ScheduledPerformingPhysicianName",
    "scheduled_procedure_step_description": "ScheduledProcedureStepDescription",
    "scheduled_procedure_step_id": "ScheduledProcedureStepID",
    "scheduled_procedure_step_location": "ScheduledProcedureStepLocation",
}

_STEP_ID = re.compile(r"[A-Za-z0-9._-]{1,16}")
_DA = re.compile(r"[0-9]{8}")
_TM = re.compile(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?")


def make_step_id(raw: str) -> str:
    """`raw` if it is a usable step id (SH, URL-safe), else a stable 16-hex digest of it.

    >>> make_step_id("SPD3445"), make_step_id("A/B 1")
    ('SPD3445', '14112be87f1633de')
    """
    raw = raw.strip()
    if _STEP_ID.fullmatch(raw):
        return raw
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def require_step_id(value: str) -> str:
    """Return `value` if it is a step id we make (1-16 of ``A-Z a-z 0-9 . _ -``)."""
    if not _STEP_ID.fullmatch(value):
        raise InvalidItemError(f"not a step id: {value[:40]!r}")
    return value


@dataclass(frozen=True)
class WorklistItem:
    """One scheduled procedure step. `dataset` is read-only by convention."""

    step_id: str
    status: StepStatus
    dataset: Dataset

    @property
    def sps(self) -> Dataset:
        return self.dataset[SPS].value[0]  # type: ignore[no-any-return]

    def start(self) -> datetime | None:
        """Scheduled start (local time, as DICOM DA/TM are); None if there is no valid date."""
        date = str(self.sps.get("ScheduledProcedureStepStartDate", "") or "")
        time = str(self.sps.get("ScheduledProcedureStepStartTime", "") or "").split(".")[0]
        if not _DA.fullmatch(date):
            return None
        try:
            return datetime.strptime(date + (time + "000000")[:6], "%Y%m%d%H%M%S")
        except ValueError:
            return None

    def visible(self, now: datetime, past_due_hours: float) -> bool:
        """Whether C-FIND returns this step (docs/worklist.md, "What is returned").

        Closed steps never are; open ones until `past_due_hours` after their scheduled
        start (0 keeps them forever).
        """
        if self.status in CLOSED_STATUSES:
            return False
        if past_due_hours <= 0:
            return True
        start = self.start()
        return start is None or start >= now - timedelta(hours=past_due_hours)

    def with_status(self, status: StepStatus) -> WorklistItem:
        ds = _copy(self.dataset)
        ds[SPS].value[0].ScheduledProcedureStepStatus = status.value
        return WorklistItem(self.step_id, status, ds)

    def to_json(self) -> str:
        return json.dumps(self.dataset.to_json_dict(), separators=(",", ":"))

    def fields(self) -> dict[str, Any]:
        """The REST view: step id, status and the promised fields (snake_case keywords)."""
        out: dict[str, Any] = {"step_id": self.step_id, "status": self.status.value}
        for name, keyword in TOP_LEVEL_FIELDS.items():
            out[name] = _text(self.dataset, keyword)
        for name, keyword in SPS_FIELDS.items():
            out[name] = _text(self.sps, keyword)
        return out


def _element(ds: Dataset, keyword: str) -> DataElement | None:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    elem = ds.get(tag)
    return elem if isinstance(elem, DataElement) else None


def _text(ds: Dataset, keyword: str) -> str | None:
    elem = _element(ds, keyword)
    if elem is None or elem.value is None or elem.value == "":
        return None
    if elem.VM > 1:
        return "\\".join(str(v) for v in elem.value)
    return str(elem.value)


def _copy(ds: Dataset) -> Dataset:
    return Dataset.from_json(ds.to_json_dict())


def item_from_json(step_id: str, status: str, text: str) -> WorklistItem:
    return WorklistItem(step_id, StepStatus(status), Dataset.from_json(text))


def item_from_dataset(ds: Dataset, *, step_id: str | None = None) -> WorklistItem:
    """Check an MWL data set (a ``.wl`` file, a dump, a built item) and make it a step.

    The step id is `step_id`, else the SPS's ScheduledProcedureStepID, else a digest of
    the accession number, requested procedure id and start. A missing StudyInstanceUID is
    generated (stable for the same accession number).

    Raises
    ------
    InvalidItemError
        Listing every problem: no SPS item or several, no modality, no valid start date,
        no patient id or name, a malformed date, time or UID.
    """
    problems: list[str] = []
    ds = _copy(ds)
    for tag in [t for t in [e.tag for e in ds] if t.group in (0x0002,) or t.element == 0]:
        del ds[tag]
    ds.file_meta = None  # type: ignore[assignment]
    seq = _element(ds, SPS)
    if seq is None or seq.VR != "SQ" or len(seq.value) == 0:
        raise InvalidItemError(
            "ScheduledProcedureStepSequence (0040,0100) with one item is required"
        )
    if len(seq.value) > 1:
        raise InvalidItemError("only one ScheduledProcedureStepSequence item per worklist item")
    sps = seq.value[0]
    if not _text(ds, "PatientID") and not _text(ds, "PatientName"):
        problems.append("PatientID (0010,0020) or PatientName (0010,0010) is required")
    if not _text(sps, "Modality"):
        problems.append("Modality (0008,0060) in the SPS item is required")
    date = _text(sps, "ScheduledProcedureStepStartDate")
    if date is None or not _DA.fullmatch(date):
        problems.append("ScheduledProcedureStepStartDate (0040,0002) must be YYYYMMDD")
    time = _text(sps, "ScheduledProcedureStepStartTime")
    if time is not None and not _TM.fullmatch(time):
        problems.append("ScheduledProcedureStepStartTime (0040,0003) must be HHMMSS")
    birth = _text(ds, "PatientBirthDate")
    if birth is not None and not _DA.fullmatch(birth):
        problems.append("PatientBirthDate (0010,0030) must be YYYYMMDD")
    uid = _text(ds, "StudyInstanceUID")
    if uid is not None and not is_uid(uid):
        problems.append("StudyInstanceUID (0020,000D) is not a valid UID")
    status_text = _text(sps, "ScheduledProcedureStepStatus")
    try:
        status = StepStatus(status_text) if status_text else StepStatus.SCHEDULED
    except ValueError:
        problems.append(
            f"ScheduledProcedureStepStatus {(status_text or '')[:16]!r} is not a defined term"
        )
        status = StepStatus.SCHEDULED
    if problems:
        raise InvalidItemError(problems)
    accession = _text(ds, "AccessionNumber") or ""
    if uid is None:
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["vannah-mwl", accession, date or ""])
    sps_id = _text(sps, "ScheduledProcedureStepID")
    if step_id is None:
        step_id = make_step_id(
            sps_id or f"{accession}|{_text(ds, 'RequestedProcedureID')}|{date}{time}"
        )
    if not sps_id:
        sps.ScheduledProcedureStepID = step_id
    sps.ScheduledProcedureStepStatus = status.value
    return WorklistItem(require_step_id(step_id), status, ds)


def item_from_fields(fields: dict[str, Any]) -> WorklistItem:
    """Build a step from snake_case fields (the REST model, an HL7 order).

    Unknown names are an error; ``None`` values are left out.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: REST JSON and HL7 text may be any script
    sps = Dataset()
    unknown = set(fields) - set(TOP_LEVEL_FIELDS) - set(SPS_FIELDS) - {"step_id", "status"}
    if unknown:
        raise InvalidItemError(f"unknown fields: {', '.join(sorted(unknown))}")
    for name, keyword in TOP_LEVEL_FIELDS.items():
        if fields.get(name) not in (None, ""):
            setattr(ds, keyword, fields[name])
    for name, keyword in SPS_FIELDS.items():
        if fields.get(name) not in (None, ""):
            value = fields[name]
            if keyword == "ScheduledStationAETitle" and "\\" in str(value):
                value = str(value).split("\\")
            setattr(sps, keyword, value)
    if fields.get("status"):
        sps.ScheduledProcedureStepStatus = StepStatus(fields["status"]).value
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    step_id = fields.get("step_id") or fields.get("scheduled_procedure_step_id")
    return item_from_dataset(ds, step_id=make_step_id(step_id) if step_id else None)
