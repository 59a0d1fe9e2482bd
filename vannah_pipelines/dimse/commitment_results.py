"""Storage Commitment results our SCP owes (PS3.4 J.3.3): judged against the catalog, and
delivered again later when the requestor could not be reached at first.

The receiver answers an N-ACTION at once, records the result it owes
(``<data dir>/commitments/owed/<transaction uid>.json``, state ``owed``) and reports it on
the requesting association, else on a new association to the requestor's AE title in
``dicom_modalities``. When neither works (the requestor is down, or it is not configured
yet) the record stays, state ``undelivered``; a receiver killed before reporting leaves it
``owed``. :func:`report_owed_results` (run by Dagster's ``report_commitment_results_job``)
takes those records up again: each is judged afresh against the catalog, since an
instance indexed meanwhile is now held, and sent on a new association, with backoff, until
it is delivered or :data:`MAX_AGE_SECONDS` have passed (then it is set aside under
``owed/expired``, logged, and counted by the asset's metadata).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pynetdicom import AllStoragePresentationContexts

from vannah_pipelines.dimse.commitment import send_report
from vannah_pipelines.dimse.peers import DicomPeer, peer_of
from vannah_pipelines.routing.commitments import (
    CommitmentReport,
    CommitmentRequest,
    CommitmentSpool,
    FailedInstance,
    FailureReason,
    judge,
    owed_reports_dir,
)
from vannah_pipelines.settings import Settings

if TYPE_CHECKING:  # the receiver imports this module; DuckDB only with Q/R (see its app)
    from vannah_pipelines.catalog.reader import CatalogReader

log = logging.getLogger(__name__)

OWED = "owed"  # recorded when the N-ACTION was accepted; a report thread is on it
UNDELIVERED = "undelivered"  # tried, the requestor could not be reached
STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
LOOKUP_CHUNK = 1000  # SOP Instance UIDs per catalog query
# An ``owed`` record younger than this may still be on a receiver's report thread (which
# waits up to 30 s for its N-ACTION-RSP, then has its association timeouts).
IN_FLIGHT_SECONDS = 120.0
RETRY_SECONDS = 60.0  # first wait between attempts; doubles up to RETRY_MAX_SECONDS
RETRY_MAX_SECONDS = 3600.0
MAX_AGE_SECONDS = 7 * 24 * 3600.0  # then the result is set aside (owed/expired)
PER_RUN = 200  # records taken up by one call; the rest wait for the next


def held_instances(reader: CatalogReader, sops: Sequence[str]) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of those of `sops` the catalog holds (indexed,
    or landed when the reader has the landed overlay)."""
    held: dict[str, str] = {}
    for start in range(0, len(sops), LOOKUP_CHUNK):
        chunk = list(sops[start : start + LOOKUP_CHUNK])
        rows = reader.query(
            "SELECT sop_instance_uid, sop_class_uid FROM instances "
            "WHERE sop_instance_uid IN (SELECT unnest(?::VARCHAR[]))",
            [chunk],
        )
        held.update({str(sop): str(cls or "") for sop, cls in rows})
    return held


def judge_request(reader: CatalogReader, request: CommitmentRequest) -> CommitmentReport:
    """The result of `request`: what the catalog holds now. A catalog that cannot be read
    fails every reference with Processing Failure (0x0110) rather than raise."""
    try:
        held = held_instances(reader, [sop for _cls, sop in request.references])
    except Exception:
        log.exception("cannot look up commitment %s", request.transaction_uid)
        failed = tuple(
            FailedInstance(c, s, int(FailureReason.PROCESSING_FAILURE))
            for c, s in request.references
        )
        return CommitmentReport(request.transaction_uid, (), failed)
    committed, failures = judge(request.references, held, STORAGE_CLASSES)
    return CommitmentReport(request.transaction_uid, committed, failures)


def retry_wait(attempts: int) -> float:
    """Seconds to wait after `attempts` failed attempts before the next.

    >>> [retry_wait(n) for n in (0, 1, 2, 10)]
    [0.0, 60.0, 120.0, 3600.0]
    """
    if attempts <= 0:
        return 0.0
    return float(min(RETRY_SECONDS * 2 ** (attempts - 1), RETRY_MAX_SECONDS))


def is_due(record: dict[str, Any], now: float) -> bool:
    """Whether `record` is to be tried now: not on a report thread any more, and past its
    backoff (or past its age, to be set aside).

    >>> is_due({"state": "owed", "requested_at": 1000.0}, 1060.0)
    False
    >>> is_due({"state": "owed", "requested_at": 1000.0}, 1200.0)
    True
    >>> is_due({"state": "undelivered", "requested_at": 0.0, "attempts": 2,
    ...         "last_attempt_at": 1000.0}, 1100.0)
    False
    """
    requested = float(record.get("requested_at") or 0.0)
    if now - requested >= MAX_AGE_SECONDS:
        return True
    if record.get("state") == OWED and now - requested < IN_FLIGHT_SECONDS:
        return False
    attempts = int(record.get("attempts") or 0)
    last = float(record.get("last_attempt_at") or record.get("judged_at") or requested)
    return now - last >= retry_wait(attempts)


def owed_records(settings: Settings, limit: int = PER_RUN) -> Iterator[dict[str, Any]]:
    """At most `limit` owed records, oldest file first."""
    spool = CommitmentSpool(owed_reports_dir(settings.data_dir))
    for count, record in enumerate(spool.items()):
        if count >= limit:
            return
        yield record


def any_due(settings: Settings, now: float | None = None) -> bool:
    """Whether an owed result is due now (what the sensor asks before requesting a run)."""
    now = time.time() if now is None else now
    return any(is_due(r, now) for r in owed_records(settings))


@dataclass(frozen=True)
class OwedResults:
    """What one pass over the owed results did."""

    delivered: int = 0
    still_owed: int = 0  # not due yet, or tried and not delivered
    failed_attempts: int = 0  # tried this pass, not delivered
    unknown_requestor: int = 0  # the requestor's AE title is not in dicom_modalities
    expired: int = 0  # set aside this pass: older than MAX_AGE_SECONDS
    oldest_seconds: float = 0.0  # age of the oldest result still owed


Send = Callable[..., int | None]


def report_owed_results(
    settings: Settings,
    reader: CatalogReader,
    *,
    now: float | None = None,
    limit: int = PER_RUN,
    send: Send = send_report,
) -> OwedResults:
    """Take up the owed results that are due: judge each against `reader` and send it on a
    new association to its requestor; remove the delivered ones, record the attempt of
    the others, set aside the expired ones. Never raises for one record."""
    now = time.time() if now is None else now
    spool = CommitmentSpool(owed_reports_dir(settings.data_dir))
    counts = dict.fromkeys(
        ("delivered", "still_owed", "failed_attempts", "unknown_requestor", "expired"), 0
    )
    oldest = 0.0
    for record in owed_records(settings, limit):
        txn = str(record.get("transaction_uid", ""))
        try:
            outcome = _take_up(settings, reader, spool, record, now, send)
        except Exception:
            log.exception("commitment result %s: cannot take it up", txn)
            outcome = "failed_attempts"
        counts[outcome] += 1
        if outcome in ("still_owed", "failed_attempts", "unknown_requestor"):
            oldest = max(oldest, now - float(record.get("requested_at") or now))
    still = counts.pop("still_owed") + counts["failed_attempts"] + counts["unknown_requestor"]
    return OwedResults(still_owed=still, oldest_seconds=oldest, **counts)


def _take_up(
    settings: Settings,
    reader: CatalogReader,
    spool: CommitmentSpool,
    record: dict[str, Any],
    now: float,
    send: Send,
) -> str:
    txn = str(record["transaction_uid"])
    requestor = str(record.get("requestor_aet", ""))
    if not is_due(record, now):
        return "still_owed"
    if now - float(record.get("requested_at") or 0.0) >= MAX_AGE_SECONDS:
        _set_aside(spool, txn)
        log.warning(
            "commitment result %s for %s: not delivered in %d days; set aside in %s",
            txn,
            requestor,
            int(MAX_AGE_SECONDS // 86400),
            spool.folder / "expired",
        )
        return "expired"
    attempted = {
        **record,
        "state": UNDELIVERED,
        "attempts": int(record.get("attempts") or 0) + 1,
        "last_attempt_at": now,
    }
    modality = settings.modality_by_aet(requestor)
    if modality is None:
        log.warning(
            "commitment result %s: %s is not in dicom_modalities; the result is kept",
            txn,
            requestor,
        )
        spool.write(txn, attempted)
        return "unknown_requestor"
    request = CommitmentRequest(txn, tuple((str(c), str(s)) for c, s in record["references"]))
    report = judge_request(reader, request)
    peer: DicomPeer = peer_of(settings, modality)
    status = send(peer, report, calling_aet=settings.dicom_aet)
    if status is None:
        spool.write(txn, attempted)
        return "failed_attempts"
    log.info(
        "commitment %s reported to %s on a new association, attempt %d "
        "(%d committed, %d failed): status 0x%04X",
        txn,
        requestor,
        attempted["attempts"],
        len(report.committed),
        len(report.failed),
        status,
    )
    spool.remove(txn)
    return "delivered"


def _set_aside(spool: CommitmentSpool, txn: str) -> None:
    expired = spool.folder / "expired"
    expired.mkdir(parents=True, exist_ok=True)
    source = spool.path(txn)
    with contextlib.suppress(FileNotFoundError):
        source.replace(expired / Path(source).name)
