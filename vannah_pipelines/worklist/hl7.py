"""HL7 v2 orders (ORM^O01, OMI^O23) -> worklist changes, and their ACKs.

A small parser of our own (segments by CR, fields by MSH-1, components, repetitions and
escapes by MSH-2): the ``hl7`` package on PyPI has had no release since 2022. Field
mapping follows IHE RAD TF-2 (Scheduled Workflow) where it has one; see docs/worklist.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vannah_pipelines.worklist.errors import InvalidItemError, StepNotFoundError
from vannah_pipelines.worklist.model import StepStatus, item_from_fields, make_step_id
from vannah_pipelines.worklist.store import WorklistStore

log = logging.getLogger(__name__)

SOURCE = "hl7"
SUPPORTED = {("ORM", "O01"), ("OMI", "O23")}


class Hl7Error(InvalidItemError):
    """A message we refuse. ``code`` is the ACK code: AR (rejected: not a message we take)
    or AE (error: a message we take, with missing or bad fields)."""

    def __init__(self, code: str, reasons: list[str] | str) -> None:
        super().__init__(reasons)
        self.code = code


@dataclass(frozen=True)
class Message:
    """A parsed HL7 v2 message: segments as lists of raw (still escaped) fields."""

    segments: list[list[str]]
    separators: str  # field, component, repetition, escape, subcomponent

    def segment(self, name: str) -> list[str] | None:
        return next((s for s in self.segments if s[0] == name), None)

    def get(self, name: str, field: int, component: int = 1, repetition: int = 0) -> str:
        """Field ``name-field.component`` (1-based, as HL7 counts; MSH-1 is the separator)."""
        seg = self.segment(name)
        if seg is None:
            return ""
        index = field  # MSH: fields[1] is MSH-1 (the separator), as for other segments
        if index < 0 or index >= len(seg):
            return ""
        if name == "MSH" and field <= 2:
            return seg[index]
        reps = seg[index].split(self.separators[2])
        if repetition >= len(reps):
            return ""
        comps = reps[repetition].split(self.separators[1])
        if component - 1 >= len(comps):
            return ""
        return _unescape(comps[component - 1].split(self.separators[4])[0], self.separators)

    def components(self, name: str, field: int) -> list[str]:
        return [self.get(name, field, c) for c in range(1, 7)]


def _unescape(text: str, seps: str) -> str:
    esc = seps[3]
    if esc not in text:
        return text
    table = {"F": seps[0], "S": seps[1], "R": seps[2], "E": esc, "T": seps[4]}
    out, i = [], 0
    while i < len(text):
        end = text.find(esc, i + 1) if text[i] == esc else -1
        if end > 0 and text[i + 1 : end] in table:
            out.append(table[text[i + 1 : end]])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_message(text: str) -> Message:
    """Split an HL7 v2 message into segments and fields.

    >>> m = parse_message("MSH|^~\\\\&|RIS|H|||20240101||ORM^O01|1|P|2.3\\rPID|||42^^^H||DOE^JO")
    >>> m.get("MSH", 9, 2), m.get("PID", 3), m.get("PID", 5, 2)
    ('O01', '42', 'JO')

    Raises
    ------
    Hl7Error
        (AR) if it does not start with an MSH segment.
    """
    text = text.strip("\x0b\x1c\r\n ")
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7Error("AR", "not an HL7 v2 message (no MSH segment first)")
    field_sep = text[3]
    lines = [seg for seg in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if seg]
    encoding = lines[0][4:].split(field_sep, 1)[0]
    if len(encoding) < 4:
        raise Hl7Error("AR", "MSH-2 encoding characters are incomplete")
    seps = field_sep + encoding[:4] if len(encoding) >= 4 else field_sep + "^~\\&"
    segments = []
    for line in lines:
        if line.startswith("MSH"):
            fields = ["MSH", field_sep, *line[4:].split(field_sep)]
        else:
            fields = line.split(field_sep)
        segments.append(fields)
    return Message(segments, seps)


@dataclass(frozen=True)
class OrderResult:
    step_id: str
    action: str  # create|update|status


_SEX = {"M": "M", "F": "F", "O": "O", "U": "O", "A": "O", "N": "O"}
_PRIORITY = {"S": "STAT", "A": "HIGH", "R": "ROUTINE", "P": "ROUTINE", "T": "MEDIUM"}
_CANCEL = {"CA": StepStatus.CANCELED, "OC": StepStatus.CANCELED, "CR": StepStatus.CANCELED}
_DISCONTINUE = {"DC": StepStatus.DISCONTINUED, "OD": StepStatus.DISCONTINUED}
_ORDER_STATUS = {  # ORC-5 of an SC message
    "CM": StepStatus.COMPLETED,
    "IP": StepStatus.STARTED,
    "CA": StepStatus.CANCELED,
    "DC": StepStatus.DISCONTINUED,
    "SC": StepStatus.SCHEDULED,
    "A": StepStatus.ARRIVED,
}


def _pn(m: Message, seg: str, field: int, *, offset: int = 0) -> str | None:
    """HL7 XPN/XCN name -> DICOM PN.

    HL7 orders family^given^middle^suffix^prefix; DICOM family^given^middle^prefix^suffix.
    """
    c = [m.get(seg, field, i + offset) for i in range(1, 6)]
    parts = [c[0], c[1], c[2], c[4], c[3]]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts) or None


def _first(*values: str) -> str:
    return next((v for v in values if v), "")


def _identifiers(m: Message) -> tuple[str, str]:
    """(step id, accession number) of the order."""
    accession = _first(
        m.get("IPC", 1),
        m.get("OBR", 18),
        m.get("OBR", 3),
        m.get("ORC", 3),
        m.get("OBR", 2),
        m.get("ORC", 2),
    )
    step = _first(m.get("IPC", 4), m.get("OBR", 20), accession)
    return step, accession


def order_fields(m: Message) -> dict[str, Any]:
    """The step fields of a new or replaced order.

    Raises
    ------
    Hl7Error
        (AE) listing each required field that is missing or malformed.
    """
    problems: list[str] = []
    step, accession = _identifiers(m)
    start = _first(m.get("TQ1", 7), m.get("OBR", 27, 4), m.get("ORC", 7, 4), m.get("OBR", 36))
    modality = _first(m.get("IPC", 5), m.get("OBR", 24), m.get("ZDS", 2))
    fields: dict[str, Any] = {
        "patient_id": m.get("PID", 3),
        "patient_name": _pn(m, "PID", 5),
        "patient_birth_date": m.get("PID", 7)[:8] or None,
        "patient_sex": _SEX.get(m.get("PID", 8)[:1].upper()),
        "accession_number": accession[:16] or None,
        "referring_physician_name": _pn(m, "PV1", 8, offset=1),
        "requesting_physician": _pn(m, "OBR", 16, offset=1),
        "requested_procedure_id": _first(m.get("IPC", 2), m.get("OBR", 19), accession)[:16] or None,
        "requested_procedure_description": _first(m.get("OBR", 4, 2), m.get("OBR", 4, 1))[:64]
        or None,
        "requested_procedure_priority": _PRIORITY.get(
            _first(m.get("OBR", 27, 6), m.get("ORC", 7, 6), m.get("OBR", 5))[:1].upper()
        ),
        "study_instance_uid": _first(m.get("IPC", 3), m.get("ZDS", 1)) or None,
        "modality": modality[:16] or None,
        "scheduled_station_ae_title": _first(m.get("IPC", 9), m.get("OBR", 21))[:16] or None,
        "scheduled_station_name": _first(m.get("IPC", 7), m.get("OBR", 21, 2))[:16] or None,
        "scheduled_procedure_step_location": m.get("IPC", 8)[:16] or None,
        "scheduled_procedure_step_start_date": start[:8] or None,
        "scheduled_procedure_step_start_time": start[8:14] or None,
        "scheduled_performing_physician_name": _pn(m, "OBR", 34, offset=1),
        "scheduled_procedure_step_description": _first(m.get("OBR", 4, 2), m.get("OBR", 4, 1))[:64]
        or None,
        "scheduled_procedure_step_id": make_step_id(step) if step else None,
    }
    required = {
        "PID-3 (patient id)": fields["patient_id"],
        "PID-5 (patient name)": fields["patient_name"],
        "OBR-18/OBR-3/ORC-2 (accession or order number)": accession,
        "OBR-24 or IPC-5 (modality)": fields["modality"],
        "TQ1-7/OBR-27.4/ORC-7.4/OBR-36 (scheduled date/time)": start,
    }
    problems.extend(f"missing {name}" for name, value in required.items() if not value)
    if start:
        try:
            datetime.strptime(start[:8], "%Y%m%d")
        except ValueError:
            problems.append(f"scheduled date/time {start[:26]!r} is not YYYYMMDD[HHMM[SS]]")
    if problems:
        raise Hl7Error("AE", problems)
    return fields


def apply_message(m: Message, store: WorklistStore) -> list[OrderResult]:
    """Apply an order message to the store (every ORC/OBR order group of it, all or none).

    Raises
    ------
    Hl7Error
        AR for a message type or order control we do not take; AE for missing fields or
        an unknown order being cancelled, completed or changed.
    """
    kind = (m.get("MSH", 9, 1), m.get("MSH", 9, 2))
    if kind not in SUPPORTED:
        raise Hl7Error("AR", f"unsupported message type {'^'.join(kind)}: want ORM^O01 or OMI^O23")
    control = m.get("ORC", 1).upper()
    if not control:
        raise Hl7Error("AE", "missing ORC-1 (order control)")
    step, _accession = _identifiers(m)
    if control in ("NW", "XO", "SN", "NA", "XX", "RP", "RU"):
        fields = order_fields(m)
        try:
            item = item_from_fields(fields)
        except InvalidItemError as exc:
            raise Hl7Error("AE", exc.reasons) from exc
        (action,) = store.upsert([item], SOURCE)
        return [OrderResult(item.step_id, action)]
    status = _CANCEL.get(control) or _DISCONTINUE.get(control)
    if control == "SC":
        status = _ORDER_STATUS.get(m.get("ORC", 5).upper())
        if status is None:
            raise Hl7Error("AE", f"unsupported ORC-5 order status {m.get('ORC', 5)[:8]!r}")
    if status is None:
        raise Hl7Error("AR", f"unsupported ORC-1 order control {control[:4]!r}")
    if not step:
        raise Hl7Error("AE", "missing OBR-20/OBR-18/ORC-2 (which order)")
    try:
        item = store.set_status(make_step_id(step), status, SOURCE)
    except StepNotFoundError as exc:
        raise Hl7Error("AE", f"unknown order: {exc}") from exc
    return [OrderResult(item.step_id, "status")]


def build_ack(
    message: Message | None, code: str, text: str = "", *, now: datetime | None = None
) -> str:
    """An HL7 ACK (MSH + MSA [+ ERR]) for `message`, with CR segment separators."""
    seps = message.separators if message else "|^~\\&"
    f = seps[0]
    stamp = (now or datetime.now()).strftime("%Y%m%d%H%M%S")
    get = message.get if message else (lambda *a: "")
    trigger = get("MSH", 9, 2)
    control_id = get("MSH", 10)
    version = get("MSH", 12) or "2.5.1"
    msh = f.join(
        [
            "MSH",
            seps[1:],
            "VANNAH",
            "VANNAHCLOUD",
            get("MSH", 3),
            get("MSH", 4),
            stamp,
            "",
            f"ACK{seps[1]}{trigger}" if trigger else "ACK",
            f"ACK{control_id}"[:20],
            "P",
            version,
        ]
    )
    clean = text.replace("\r", " ").replace("\n", " ")
    for ch in seps:
        clean = clean.replace(ch, " ")
    segments = [msh, f.join(["MSA", code, control_id, clean[:80]])]
    if code != "AA" and clean:
        severity = "E"
        segments.append(f.join(["ERR", "", "", "", severity, "", "", "", clean[:250]]))
    return "\r".join(segments) + "\r"


def handle_message(text: str, store: WorklistStore) -> tuple[str, str]:
    """Apply one message and answer it: (ACK text, ACK code). Never raises for bad input."""
    message: Message | None = None
    try:
        message = parse_message(text)
        results = apply_message(message, store)
    except Hl7Error as exc:
        # Identifiers only: the reasons may quote patient or order values.
        control_id = message.get("MSH", 10)[:20] if message else ""
        log.warning("HL7 message %s refused with %s", control_id, exc.code)
        return build_ack(message, exc.code, "; ".join(exc.reasons)), exc.code
    log.info(
        "HL7 message %s applied: %s",
        message.get("MSH", 10)[:20],
        ", ".join(r.action for r in results),
    )
    return build_ack(message, "AA"), "AA"


def split_batch(text: str) -> list[str]:
    """Split a file holding one or more messages (each starting with MSH)."""
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    messages: list[str] = []
    for segment in text.split("\r"):
        if segment.startswith("MSH"):
            messages.append(segment)
        elif segment.strip() and messages:
            messages[-1] += "\r" + segment
    return messages
