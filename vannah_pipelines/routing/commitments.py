"""Storage Commitment (PS3.4 Annex J) without the network: the transactions' records, and
the N-ACTION / N-EVENT-REPORT data sets as plain values.

One JSON record per transaction, ``<folder>/<transaction uid>.json``, written whole by a
rename (a reader sees the old record or the new one, never half), so a transaction
requested before a crash is still pending after it. The requesting side (routing, through
``vannah_pipelines.dimse.commitment``) writes ``pending``; whoever receives the
N-EVENT-REPORT (the requesting association, or the receiver on a new association) writes
``reported`` with what was committed and what failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from vannah_pipelines.dicom.uids import is_uid, require_uid
from vannah_pipelines.errors import UnsafeUidError, VannahError

log = logging.getLogger(__name__)

# PS3.4 J.3.5: the Push Model SOP class and its well-known SOP instance.
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_ACTION_TYPE = 1  # PS3.4 J.3.2.1: Request Storage Commitment

PENDING = "pending"
REPORTED = "reported"
SUFFIX = ".json"
# The records :meth:`CommitmentSpool.reported` reads whole per call (a sensor tick), oldest
# first; the rest wait for the next call.
REPORTS_PER_TICK = 1000
# The largest record read: 10,000 references (the most a request holds) take ~1.5 MiB. A
# larger record file is never read; the spool sets it aside under ``rejected/``.
RECORD_MAX_BYTES = 8 << 20
REJECTED_DIR = "rejected"
# A request whose N-EVENT-REPORT has not come this long after it was sent is taken as
# refused whole (its instances are sent again, with a new request): PS3.4 J.3.3 leaves
# the wait to the SCU, and a record must not wait for ever.
REPORT_WAIT_SECONDS = 24 * 3600
# A record's last bytes: json.dumps(sort_keys=True) puts "state" just before
# "transaction_uid", the last key, so a pending record is known without reading it whole.
_TAIL_BYTES = 256
_PENDING_TAIL = b'"state": "pending"'


class CommitmentEventType(IntEnum):
    """PS3.4 J.3.3.1: the N-EVENT-REPORT Event Type ID of a Storage Commitment Result."""

    SUCCESS = 1  # every referenced instance committed
    FAILURES_EXIST = 2  # Failed SOP Sequence lists what was not


class FailureReason(IntEnum):
    """PS3.4 J.3.3.1.1 (0008,1197) Failure Reason of one referenced instance."""

    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    RESOURCE_LIMITATION = 0x0213
    REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    CLASS_INSTANCE_CONFLICT = 0x0119
    DUPLICATE_TRANSACTION_UID = 0x0131


class CommitmentError(VannahError):
    """A Storage Commitment data set that is not what PS3.4 Annex J describes."""


Reference = tuple[str, str]  # (SOP Class UID, SOP Instance UID)


@dataclass(frozen=True)
class FailedInstance:
    """One referenced instance the peer did not commit, and why (a :class:`FailureReason`
    value, or whatever code the peer sent)."""

    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int


@dataclass(frozen=True)
class CommitmentReport:
    """The Event Information of a Storage Commitment Result (PS3.4 Table J.3-2)."""

    transaction_uid: str
    committed: tuple[Reference, ...] = ()
    failed: tuple[FailedInstance, ...] = ()

    @property
    def event_type(self) -> CommitmentEventType:
        """1 when nothing failed, else 2 (PS3.4 J.3.3.1.2)."""
        return CommitmentEventType.FAILURES_EXIST if self.failed else CommitmentEventType.SUCCESS


@dataclass(frozen=True)
class CommitmentRequest:
    """The Action Information of a Storage Commitment Request (PS3.4 Table J.3-1)."""

    transaction_uid: str
    references: tuple[Reference, ...] = field(default=())


def request_dataset(request: CommitmentRequest) -> Dataset:
    """The N-ACTION's Action Information: Transaction UID and Referenced SOP Sequence.

    >>> ds = request_dataset(CommitmentRequest("1.2.3", (("1.2.840.10008.5.1.4.1.1.2", "1.2.4"),)))
    >>> ds.TransactionUID, ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    ('1.2.3', '1.2.4')
    """
    ds = Dataset()
    ds.TransactionUID = request.transaction_uid
    ds.ReferencedSOPSequence = DicomSequence(
        [_reference_item(sop_class, sop) for sop_class, sop in request.references]
    )
    return ds


def parse_request(ds: Dataset, max_references: int) -> CommitmentRequest:
    """The request an N-ACTION's Action Information holds.

    Raises
    ------
    CommitmentError
        If the Transaction UID or a reference is missing or not a UID, if there is no
        reference, or if there are more than `max_references`.
    """
    transaction = _uid(ds, "TransactionUID")
    items = ds.get("ReferencedSOPSequence") or []
    if not items:
        raise CommitmentError("the Referenced SOP Sequence is empty or missing")
    if len(items) > max_references:
        raise CommitmentError(f"{len(items)} references: more than {max_references}")
    references = tuple(
        (_uid(item, "ReferencedSOPClassUID"), _uid(item, "ReferencedSOPInstanceUID"))
        for item in items
    )
    return CommitmentRequest(transaction, references)


def report_dataset(report: CommitmentReport, retrieve_aet: str = "") -> Dataset:
    """The N-EVENT-REPORT's Event Information (PS3.4 Table J.3-2): the Referenced SOP
    Sequence of what was committed, the Failed SOP Sequence (event type 2) of what was not.

    >>> failed = FailedInstance("1.2.5", "1.2.7", 0x0112)
    >>> r = CommitmentReport("1.2.3", (("1.2.5", "1.2.6"),), (failed,))
    >>> ds = report_dataset(r)
    >>> int(r.event_type), ds.FailedSOPSequence[0].FailureReason
    (2, 274)
    """
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if retrieve_aet:
        ds.RetrieveAETitle = retrieve_aet
    if report.committed:
        ds.ReferencedSOPSequence = DicomSequence(
            [_reference_item(sop_class, sop) for sop_class, sop in report.committed]
        )
    if report.failed:
        items = []
        for failed in report.failed:
            item = _reference_item(failed.sop_class_uid, failed.sop_instance_uid)
            item.FailureReason = int(failed.failure_reason)
            items.append(item)
        ds.FailedSOPSequence = DicomSequence(items)
    return ds


def parse_report(event_type: int, ds: Dataset) -> CommitmentReport:
    """The result an N-EVENT-REPORT's Event Information holds.

    Raises
    ------
    CommitmentError
        If `event_type` is not 1 or 2, or the Transaction UID is missing or not a UID.
        A malformed reference is not fatal: it is left out.
    """
    if event_type not in (CommitmentEventType.SUCCESS, CommitmentEventType.FAILURES_EXIST):
        raise CommitmentError(f"event type {event_type} is not a Storage Commitment Result")
    transaction = _uid(ds, "TransactionUID")
    committed: list[Reference] = []
    for item in ds.get("ReferencedSOPSequence") or []:
        sop_class = item.get("ReferencedSOPClassUID", "")
        sop = item.get("ReferencedSOPInstanceUID", "")
        if is_uid(str(sop)):
            committed.append((str(sop_class), str(sop)))
    failed: list[FailedInstance] = []
    for item in ds.get("FailedSOPSequence") or []:
        sop = str(item.get("ReferencedSOPInstanceUID", ""))
        if is_uid(sop):
            reason = item.get("FailureReason")
            failed.append(
                FailedInstance(
                    str(item.get("ReferencedSOPClassUID", "")),
                    sop,
                    int(reason) if reason is not None else int(FailureReason.PROCESSING_FAILURE),
                )
            )
    return CommitmentReport(transaction, tuple(committed), tuple(failed))


def _uid(ds: Dataset, keyword: str) -> str:
    try:
        return require_uid(str(ds.get(keyword, "")).strip("\0 "), keyword)
    except UnsafeUidError as exc:
        raise CommitmentError(f"{keyword} missing or not a UID") from exc


def _reference_item(sop_class: str, sop: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop
    return item


def commitments_dir(data_dir: Path) -> Path:
    """The folder of the transactions we requested: ``<data dir>/commitments``."""
    return Path(data_dir) / "commitments"


def owed_reports_dir(data_dir: Path) -> Path:
    """The folder of the results our SCP owes a requestor and could not deliver yet:
    ``<data dir>/commitments/owed`` (a report delivered removes its record)."""
    return commitments_dir(data_dir) / "owed"


class CommitmentSpool:
    """The records under `folder`, one per Transaction UID.

    A record is a JSON object: ``transaction_uid``, ``state`` (``pending`` or
    ``reported``), ``peer`` (``aet``, ``host``, ``port``), ``calling_aet``,
    ``requested_at`` / ``reported_at`` (Unix seconds), ``references`` (``[class, instance]``
    pairs), and once reported ``committed`` (pairs), ``failed`` (objects with
    ``sop_class_uid``, ``sop_instance_uid``, ``failure_reason``), ``reported_by`` (the
    reporting AE title) and ``reported_on`` (``same-association`` or ``new-association``).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, transaction_uid: str) -> Path:
        return self.folder / f"{require_uid(transaction_uid, 'TransactionUID')}{SUFFIX}"

    def write(self, transaction_uid: str, record: dict[str, Any]) -> None:
        """Write `record` (its ``transaction_uid`` key set) whole: temp file, fsync, rename."""
        target = self.path(transaction_uid)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".tmp-{target.name}.{os.getpid()}.{id(record)}"
        data = json.dumps({**record, "transaction_uid": transaction_uid}, sort_keys=True)
        try:
            with tmp.open("w") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, transaction_uid: str) -> dict[str, Any] | None:
        """The record of `transaction_uid`, or None if there is none (or it is unreadable)."""
        return _load(self.path(transaction_uid))

    def items(self) -> Iterator[dict[str, Any]]:
        """Every readable record, in file name order (unreadable files are skipped)."""
        try:
            paths = sorted(self.folder.glob(f"*{SUFFIX}"))
        except FileNotFoundError:
            return
        for path in paths:
            record = _load(path)
            if record is not None:
                yield record

    def reported(
        self,
        limit: int = REPORTS_PER_TICK,
        max_bytes: int = RECORD_MAX_BYTES,
        *,
        wait_seconds: float = REPORT_WAIT_SECONDS,
        now: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The records in state ``reported``, oldest first (by modification time: when
        the report was written), one at a time; at most `limit` record files are read
        whole per call, the rest are left for the next call.

        A pending record is known from its last bytes and skipped without being read
        whole (nor counted) — until it is `wait_seconds` old (its modification time: when
        the request was sent): then it comes as a report of its own, every reference
        failed (``expired`` set, with the reason), and is removed once applied like any
        report. A file larger than `max_bytes`, or not a record (not JSON, no Transaction
        UID), is moved to ``rejected/`` with a ``.reason`` file and logged; a file over
        `max_bytes` is never read.
        """
        oldest_pending = (time.time() if now is None else now) - wait_seconds
        entries: list[tuple[int, str, int]] = []  # (mtime ns, name, size)
        try:
            with os.scandir(self.folder) as scan:
                for entry in scan:
                    if entry.name.startswith(".") or not entry.name.endswith(SUFFIX):
                        continue
                    with contextlib.suppress(OSError):  # gone meanwhile, or not a file
                        if entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            entries.append((st.st_mtime_ns, entry.name, st.st_size))
        except FileNotFoundError:
            return
        entries.sort()
        read = 0
        for mtime_ns, name, size in entries:
            if read >= limit:
                return
            path = self.folder / name
            if size > max_bytes:
                self.reject(path, f"{size} bytes, more than the limit of {max_bytes}; not read")
                continue
            try:
                if _ends_pending(path) and mtime_ns / 1e9 > oldest_pending:
                    continue
                data = _read_at_most(path, max_bytes)
            except OSError:  # removed (applied, or delivered) meanwhile
                continue
            read += 1
            if data is None:
                self.reject(path, f"grew past the limit of {max_bytes} bytes; not read further")
                continue
            record = _parse(data)
            if record is None:
                self.reject(path, "not a commitment record (JSON with a Transaction UID)")
            elif record.get("state") == REPORTED:
                yield record
            elif record.get("state") == PENDING:
                yield _expired(record, wait_seconds)

    def reject(self, path: Path, reason: str) -> None:
        """Move the record file `path` to ``rejected/`` (with ``<name>.reason``); logged."""
        folder = self.folder / REJECTED_DIR
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{path.name}.reason").write_text(reason + "\n")
            path.replace(folder / path.name)
        except OSError as exc:
            log.error("commitment record %s not set aside (%s): %s", path, reason, exc)
            return
        log.warning("commitment record %s set aside in %s: %s", path.name, folder, reason)

    def pending(self) -> list[dict[str, Any]]:
        """The transactions still waiting for their N-EVENT-REPORT."""
        return [r for r in self.items() if r.get("state") == PENDING]

    def remove(self, transaction_uid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(transaction_uid).unlink()

    def record_pending(
        self,
        request: CommitmentRequest,
        *,
        peer_aet: str,
        peer_host: str,
        peer_port: int,
        calling_aet: str,
    ) -> dict[str, Any]:
        """Write the pending record of a request about to be sent; returns it."""
        record: dict[str, Any] = {
            "state": PENDING,
            "peer": {"aet": peer_aet.strip(), "host": peer_host, "port": peer_port},
            "calling_aet": calling_aet.strip(),
            "requested_at": time.time(),
            "references": [list(ref) for ref in request.references],
        }
        self.write(request.transaction_uid, record)
        return {**record, "transaction_uid": request.transaction_uid}


def _expired(record: dict[str, Any], wait_seconds: float) -> dict[str, Any]:
    """A pending record whose report never came, as a report failing every reference."""
    peer = record.get("peer", {}).get("aet", "the peer")
    reason = f"no N-EVENT-REPORT from {peer} within {wait_seconds / 3600:g} h"
    log.warning("Storage Commitment %s: %s", record.get("transaction_uid"), reason)
    return {
        **record,
        "state": REPORTED,
        "expired": reason,
        "committed": [],
        "failed": [
            {
                "sop_class_uid": c,
                "sop_instance_uid": i,
                "failure_reason": int(FailureReason.PROCESSING_FAILURE),
            }
            for c, i in record.get("references") or []
        ],
    }


class UnknownTransactionError(CommitmentError):
    """A report for a transaction we have no record of (or one asked of another peer)."""


def apply_report(
    spool: CommitmentSpool,
    report: CommitmentReport,
    *,
    reported_by: str,
    same_association: bool,
) -> dict[str, Any]:
    """Record `report` as the result of its pending transaction; returns the new record.

    A report for a transaction already reported replaces the earlier result (a peer that
    re-sends the same report is answered Success again).

    Raises
    ------
    UnknownTransactionError
        If there is no record of the Transaction UID, or it was requested of an AE title
        other than `reported_by`.
    OSError
        If the record cannot be written.
    """
    record = spool.read(report.transaction_uid)
    if record is None:
        raise UnknownTransactionError(f"no transaction {report.transaction_uid}")
    asked = str(record.get("peer", {}).get("aet", "")).strip()
    if asked and asked != reported_by.strip():
        raise UnknownTransactionError(
            f"transaction {report.transaction_uid} was requested of {asked}, "
            f"not {reported_by.strip()}"
        )
    updated = {
        **record,
        "state": REPORTED,
        "reported_at": time.time(),
        "reported_by": reported_by.strip(),
        "reported_on": "same-association" if same_association else "new-association",
        "committed": [list(ref) for ref in report.committed],
        "failed": [
            {
                "sop_class_uid": f.sop_class_uid,
                "sop_instance_uid": f.sop_instance_uid,
                "failure_reason": int(f.failure_reason),
            }
            for f in report.failed
        ],
    }
    spool.write(report.transaction_uid, updated)
    return updated


def judge(
    references: Sequence[Reference],
    held: dict[str, str],
    supported_classes: frozenset[str] | None = None,
) -> tuple[tuple[Reference, ...], tuple[FailedInstance, ...]]:
    """Which `references` the archive commits to: those it holds with the same SOP class.

    Parameters
    ----------
    references
        (SOP Class UID, SOP Instance UID) pairs of the request.
    held
        SOP Instance UID -> SOP Class UID of the instances the archive holds among them.
    supported_classes
        The storage SOP classes the archive stores (None: any).

    Returns
    -------
    tuple
        (committed references, failed instances with their PS3.4 J.3.3.1.1 reason).

    >>> refs = [("1.2.1", "9.1"), ("1.2.1", "9.2"), ("1.2.2", "9.3")]
    >>> committed, failed = judge(refs, {"9.1": "1.2.1", "9.3": "1.2.1"})
    >>> committed, [(f.sop_instance_uid, hex(f.failure_reason)) for f in failed]
    ((('1.2.1', '9.1'),), [('9.2', '0x112'), ('9.3', '0x119')])
    """
    committed: list[Reference] = []
    failed: list[FailedInstance] = []
    for sop_class, sop in references:
        if supported_classes is not None and sop_class not in supported_classes:
            reason: FailureReason | None = FailureReason.REFERENCED_SOP_CLASS_NOT_SUPPORTED
        elif sop not in held:
            reason = FailureReason.NO_SUCH_OBJECT_INSTANCE
        elif held[sop] and held[sop] != sop_class:
            reason = FailureReason.CLASS_INSTANCE_CONFLICT
        else:
            reason = None
        if reason is None:
            committed.append((sop_class, sop))
        else:
            failed.append(FailedInstance(sop_class, sop, int(reason)))
    return tuple(committed), tuple(failed)


def _load(path: Path, max_bytes: int = RECORD_MAX_BYTES) -> dict[str, Any] | None:
    """The record in `path`; None when it is missing, unreadable, larger than
    `max_bytes` (not read past that) or not a record."""
    try:
        data = _read_at_most(path, max_bytes)
    except OSError:
        return None
    return None if data is None else _parse(data)


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
        if not isinstance(record, dict):
            return None
        record["transaction_uid"] = require_uid(str(record["transaction_uid"]), "TransactionUID")
    except (ValueError, KeyError, TypeError, UnsafeUidError, RecursionError):
        return None
    return record


def _read_at_most(path: Path, max_bytes: int) -> bytes | None:
    """The bytes of `path`, or None when it holds more than `max_bytes` (never read
    further than ``max_bytes + 1``)."""
    with path.open("rb") as fp:
        if os.fstat(fp.fileno()).st_size > max_bytes:
            return None
        data = fp.read(max_bytes + 1)
    return None if len(data) > max_bytes else data


def _ends_pending(path: Path) -> bool:
    """Whether the last bytes of the record `path` say it is pending (_PENDING_TAIL)."""
    with path.open("rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        fp.seek(max(0, size - _TAIL_BYTES))
        tail = fp.read(_TAIL_BYTES)
    marker = tail.rfind(_PENDING_TAIL)
    # Only "transaction_uid" may follow "state" in a record written by CommitmentSpool.
    return marker >= 0 and b'"state"' not in tail[marker + len(_PENDING_TAIL) :]
