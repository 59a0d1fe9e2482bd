"""Storage Commitment Push Model (PS3.4 Annex J) in the receiver: the SCP that confirms what
the archive holds, and the SCU's end that takes reports arriving on a new association.

N-ACTION: answered at once (Success, or why the request is refused); the held instances
are then looked up in the catalog (indexed or landed) by one of a few report threads,
which send the N-EVENT-REPORT on the same association while the requestor is still there,
else on a new association to its AE title in ``dicom_modalities``. The result owed is kept
on disk until delivered (``<data dir>/commitments/owed``); Dagster's
``report_commitment_results_job`` delivers it later (``vannah_pipelines.dimse.commitment_results``).

N-EVENT-REPORT: the result of a transaction we requested (routing's
``vannah_pipelines.dimse.commitment``), matched by Transaction UID to its pending record.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_messages import N_ACTION_RSP
from pynetdicom.events import Event

from receiver.archive import Archive
from receiver.handlers import AssociationLog, association_admission
from receiver.status import CommitmentStatus
from vannah_pipelines.dimse.commitment import receive_report, send_report, send_report_on
from vannah_pipelines.dimse.commitment_results import OWED, UNDELIVERED, judge_request
from vannah_pipelines.dimse.peers import peer_of
from vannah_pipelines.routing.commitments import (
    REQUEST_ACTION_TYPE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentError,
    CommitmentReport,
    CommitmentRequest,
    CommitmentSpool,
    commitments_dir,
    owed_reports_dir,
    parse_request,
)
from vannah_pipelines.security.principal import Role

log = logging.getLogger(__name__)

MAX_REFERENCES = 10_000  # references in one request; more are refused (0x0213)
REPORT_THREADS = 2  # a worker's threads looking up and sending results
MAX_QUEUED_REPORTS = 32  # results waiting for a thread; more requests are refused (0x0213)
RESPONSE_WAIT_SECONDS = 30.0  # how long a report waits for the N-ACTION-RSP to be sent


@dataclass
class _Owed:
    """A result the SCP owes: the request, who asked, and on which association."""

    request: CommitmentRequest
    requestor_aet: str
    assoc: Any
    response_sent: threading.Event


class Commitments:
    """A worker's Storage Commitment: the spools and the bounded report threads."""

    def __init__(self, archive: Archive, associations: AssociationLog | None = None) -> None:
        self.archive = archive
        settings = archive.settings
        self.spool = CommitmentSpool(commitments_dir(settings.data_dir))
        self.owed = CommitmentSpool(owed_reports_dir(settings.data_dir))
        self.associations = associations
        self._lock = threading.Lock()
        self._queued = 0
        self._executor: ThreadPoolExecutor | None = None

    def handlers(self) -> list[Any]:
        """The handler bindings for ``ae.make_server(evt_handlers=...)``."""
        return [
            (evt.EVT_N_ACTION, self.handle_n_action),
            (evt.EVT_N_EVENT_REPORT, self.handle_n_event_report),
        ]

    def handle_n_action(self, event: Event) -> tuple[int, Dataset | None]:
        """EVT_N_ACTION: accept a Storage Commitment Request (PS3.4 J.3.2.1.3) and queue
        its result; never raises."""
        try:
            return int(self._accept(event)), None
        except Exception:
            log.exception("a commitment request failed unexpectedly")
            return int(CommitmentStatus.PROCESSING_FAILURE), None

    def _accept(self, event: Event) -> CommitmentStatus:
        requestor = str(event.assoc.requestor.ae_title).strip()
        if self.associations is not None:
            self.associations.note(id(event.assoc), "commitment")
        admission = association_admission(event)
        if admission is not None and not (
            admission.principal.has(Role.READ) or admission.principal.has(Role.WRITE)
        ):
            log.warning("refused a commitment request from %s: not authorized", requestor)
            return CommitmentStatus.NOT_AUTHORIZED
        request: Any = event.request
        if str(request.RequestedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            return CommitmentStatus.NO_SUCH_SOP_CLASS
        if event.action_type != REQUEST_ACTION_TYPE:
            return CommitmentStatus.NO_SUCH_ACTION
        try:
            parsed = parse_request(event.action_information, MAX_REFERENCES)
        except CommitmentError as exc:
            log.warning("refused a commitment request from %s: %s", requestor, exc)
            if "more than" in str(exc):
                return CommitmentStatus.RESOURCE_LIMITATION
            return CommitmentStatus.INVALID_ARGUMENT_VALUE
        with self._lock:
            if self._queued >= MAX_QUEUED_REPORTS:
                log.warning("refused a commitment request from %s: too many queued", requestor)
                return CommitmentStatus.RESOURCE_LIMITATION
            self._queued += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(REPORT_THREADS, "commitment")
            executor = self._executor
        try:
            self.owed.write(parsed.transaction_uid, _owed_record(parsed, requestor))
        except OSError:
            with self._lock:
                self._queued -= 1
            log.exception("cannot record commitment request %s", parsed.transaction_uid)
            return CommitmentStatus.PROCESSING_FAILURE
        sent = threading.Event()

        def on_sent(sent_event: Event) -> None:
            if isinstance(sent_event.message, N_ACTION_RSP):
                sent.set()

        event.assoc.bind(evt.EVT_DIMSE_SENT, on_sent)
        owed = _Owed(parsed, requestor, event.assoc, sent)
        executor.submit(self._deliver, owed, on_sent)
        log.info(
            "commitment request %s from %s: %d references",
            parsed.transaction_uid,
            requestor,
            len(parsed.references),
        )
        return CommitmentStatus.SUCCESS

    def handle_n_event_report(self, event: Event) -> tuple[int, Dataset | None]:
        """EVT_N_EVENT_REPORT: the result of a transaction we requested, on a new
        association; recorded in the spool (statuses: ``receive_report``)."""
        if self.associations is not None:
            self.associations.note(id(event.assoc), "commitment")
        status, _record = receive_report(event, self.spool, same_association=False)
        return status, None

    def _deliver(self, owed: _Owed, on_sent: Any) -> None:
        try:
            report = judge_request(self.archive.catalog.get(), owed.request)
            owed.response_sent.wait(RESPONSE_WAIT_SECONDS)
            owed.assoc.unbind(evt.EVT_DIMSE_SENT, on_sent)
            self._send(owed, report)
        except Exception:
            log.exception("reporting commitment %s failed", owed.request.transaction_uid)
        finally:
            with self._lock:
                self._queued -= 1

    def _send(self, owed: _Owed, report: CommitmentReport) -> None:
        """On the requesting association if it is still there, else on a new one to the
        requestor's AE (PS3.4 J.3.3.1.2); an undelivered result stays on disk."""
        txn = report.transaction_uid
        aet = self.archive.settings.dicom_aet
        if owed.response_sent.is_set() and owed.assoc.is_established:
            status = send_report_on(owed.assoc, report, aet)
            if status is not None:
                self._delivered(owed, report, status, "same association")
                return
        modality = self.archive.settings.modality_by_aet(owed.requestor_aet)
        if modality is None:
            log.warning(
                "commitment %s: %s is gone and not in dicom_modalities; the result is kept",
                txn,
                owed.requestor_aet,
            )
            self._keep(owed, report)
            return
        peer = peer_of(self.archive.settings, modality)
        status = send_report(peer, report, calling_aet=aet)
        if status is None:
            self._keep(owed, report)
            return
        self._delivered(owed, report, status, "new association")

    def _delivered(self, owed: _Owed, report: CommitmentReport, status: int, how: str) -> None:
        log.info(
            "commitment %s reported to %s on a %s (%d committed, %d failed): status 0x%04X",
            report.transaction_uid,
            owed.requestor_aet,
            how,
            len(report.committed),
            len(report.failed),
            status,
        )
        self.owed.remove(report.transaction_uid)

    def _keep(self, owed: _Owed, report: CommitmentReport) -> None:
        record = _owed_record(owed.request, owed.requestor_aet)
        now = time.time()
        record.update(
            state=UNDELIVERED,
            judged_at=now,
            attempts=1,
            last_attempt_at=now,
            committed=[list(ref) for ref in report.committed],
            failed=[
                {
                    "sop_class_uid": f.sop_class_uid,
                    "sop_instance_uid": f.sop_instance_uid,
                    "failure_reason": f.failure_reason,
                }
                for f in report.failed
            ],
        )
        self.owed.write(report.transaction_uid, record)

    def close(self) -> None:
        """Stop taking reports; queued ones finish (each bounded by its timeouts)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


def _owed_record(request: CommitmentRequest, requestor: str) -> dict[str, Any]:
    return {
        "state": OWED,
        "requestor_aet": requestor,
        "requested_at": time.time(),
        "references": [list(ref) for ref in request.references],
    }
