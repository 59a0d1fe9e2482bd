"""Storage Commitment Push Model (PS3.4 Annex J) over the network: request a commitment of
a peer (the SCU), and deliver a result on an association of our own (the SCP's report).

The transactions' records and data sets are :mod:`vannah_pipelines.routing.commitments`;
this module only moves them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE

from vannah_pipelines.dimse.outbound import DEFAULT_TIMEOUT, _no_association
from vannah_pipelines.dimse.peers import DicomPeer
from vannah_pipelines.routing.commitments import (
    REQUEST_ACTION_TYPE,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentError,
    CommitmentReport,
    CommitmentRequest,
    CommitmentSpool,
    FailedInstance,
    Reference,
    UnknownTransactionError,
    apply_report,
    parse_report,
    report_dataset,
    request_dataset,
)

log = logging.getLogger(__name__)

DEFAULT_WAIT_SECONDS = 10.0  # how long the requesting association waits for the report

COMMITTED = "committed"  # every reference committed
FAILURES = "failures"  # reported, with failures
PENDING = "pending"  # N-ACTION accepted; the report will come on a new association
NOT_SUPPORTED = "not-supported"  # the peer does not support Storage Commitment
REFUSED = "refused"  # the peer answered the N-ACTION with a failure status
UNREACHABLE = "unreachable"  # no association, or no N-ACTION response

# PS3.7 10.1.1.1.8: the N-EVENT-REPORT statuses this side answers.
_SUCCESS = 0x0000
_PROCESSING_FAILURE = 0x0110
_NO_SUCH_EVENT_TYPE = 0x0113
_INVALID_ARGUMENT_VALUE = 0x0115


@dataclass(frozen=True)
class CommitmentResult:
    """What came of one Storage Commitment request.

    `outcome` is one of ``committed``, ``failures``, ``pending``, ``not-supported``,
    ``refused`` or ``unreachable``. `committed` and `failed` are filled when the report
    came on the requesting association (``committed``/``failures``); for ``pending`` the
    report comes later to the receiver, which completes the spool's record.
    """

    transaction_uid: str
    outcome: str
    committed: tuple[str, ...] = ()
    failed: tuple[FailedInstance, ...] = ()
    status: int | None = None
    reason: str = ""
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        """False when the peer does not support Storage Commitment (the router then takes
        C-STORE success as delivery)."""
        return self.outcome != NOT_SUPPORTED


def request_commitment(
    peer: DicomPeer,
    refs: Sequence[Reference],
    *,
    calling_aet: str,
    spool: CommitmentSpool,
    transaction_uid: str | None = None,
    wait_seconds: float = DEFAULT_WAIT_SECONDS,
    timeout: float = DEFAULT_TIMEOUT,
) -> CommitmentResult:
    """Ask `peer` to commit to storing `refs` (PS3.4 J.3.2: N-ACTION, Action Type 1).

    Proposes the Storage Commitment Push Model SOP class; when the peer accepts it, the
    pending transaction is written to `spool` (so a crash does not forget it), the
    N-ACTION is sent, and the association stays open up to `wait_seconds` for the
    N-EVENT-REPORT (PS3.4 J.3.3). A report on it completes the record here; else the
    peer reports later on an association of its own, which the receiver takes.

    Parameters
    ----------
    peer
        The SCP to ask.
    refs
        (SOP Class UID, SOP Instance UID) of the instances sent.
    calling_aet
        Our AE title (the one the peer reports back to).
    spool
        The transactions' records (``commitments_dir(settings.data_dir)``).
    transaction_uid
        The Transaction UID to use (a new one if None; never reuse one).
    wait_seconds
        How long to wait for the report on the requesting association (0: not at all).
    timeout
        Seconds for the connection, the association answer and the N-ACTION response each.

    Returns
    -------
    CommitmentResult
        Never raises for a peer that is down, rejects, or does not support the SOP class.

    Raises
    ------
    CommitmentError
        If `refs` is empty or holds something that is not a UID.
    """
    request = CommitmentRequest(transaction_uid or generate_uid(), tuple(refs))
    dataset = request_dataset(request)
    if not request.references:
        raise CommitmentError("nothing to commit: no references")
    ae = _ae(calling_aet, timeout)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    arrived = threading.Event()
    got: list[dict[str, Any]] = []

    def on_report(event: Any) -> tuple[int, Dataset | None]:
        status, record = receive_report(event, spool, same_association=True)
        if record is not None and record["transaction_uid"] == request.transaction_uid:
            got.append(record)
            arrived.set()
        return status, None

    received: list[Any] = []
    handlers: list[Any] = [
        (evt.EVT_N_EVENT_REPORT, on_report),
        (evt.EVT_ACSE_RECV, lambda event: received.append(event.primitive)),
    ]
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.aet,
        evt_handlers=handlers,
        tls_args=None if peer.tls is None else (peer.tls, peer.host),
    )
    txn = request.transaction_uid
    if not assoc.is_established:
        if any(_accepted_without_contexts(primitive) for primitive in received):
            # pynetdicom aborts an association whose every context was rejected.
            return CommitmentResult(
                txn, NOT_SUPPORTED, reason=f"{peer.aet} does not support Storage Commitment"
            )
        return CommitmentResult(txn, UNREACHABLE, reason=_no_association(peer, received, timeout))
    try:
        accepted = [
            cx for cx in assoc.accepted_contexts if cx.abstract_syntax == STORAGE_COMMITMENT_PUSH
        ]
        if not accepted:
            return CommitmentResult(
                txn, NOT_SUPPORTED, reason=f"{peer.aet} does not support Storage Commitment"
            )
        record = spool.record_pending(
            request,
            peer_aet=peer.aet,
            peer_host=peer.host,
            peer_port=peer.port,
            calling_aet=calling_aet,
        )
        status_ds, _reply = assoc.send_n_action(
            dataset, REQUEST_ACTION_TYPE, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        status = int(status_ds.Status) if "Status" in status_ds else None
        if status is None:
            # The request may or may not have reached the peer: the record stays pending.
            return CommitmentResult(
                txn, UNREACHABLE, reason=f"no N-ACTION response within {timeout:g} s", record=record
            )
        if status != _SUCCESS:
            # PS3.4 J.3.2.1.2: a failure status ends the transaction; no report will come.
            spool.remove(txn)
            return CommitmentResult(
                txn, REFUSED, status=status, reason=f"N-ACTION status 0x{status:04X}"
            )
        if wait_seconds > 0:
            arrived.wait(wait_seconds)
    finally:
        if assoc.is_established:
            assoc.release()
    if got:
        return _reported(got[0], status)
    return CommitmentResult(txn, PENDING, status=status, record=record)


def _accepted_without_contexts(primitive: Any) -> bool:
    """An A-ASSOCIATE-AC (result 0) whose presentation contexts were all rejected."""
    if not isinstance(primitive, A_ASSOCIATE) or primitive.result != 0:
        return False
    contexts = primitive.presentation_context_definition_results_list or []
    return not any(cx.result == 0 for cx in contexts)


def _reported(record: dict[str, Any], status: int | None) -> CommitmentResult:
    failed = tuple(
        FailedInstance(f["sop_class_uid"], f["sop_instance_uid"], int(f["failure_reason"]))
        for f in record.get("failed", [])
    )
    committed = tuple(str(ref[1]) for ref in record.get("committed", []))
    return CommitmentResult(
        record["transaction_uid"],
        FAILURES if failed else COMMITTED,
        committed,
        failed,
        status,
        record=record,
    )


def receive_report(
    event: Any, spool: CommitmentSpool, *, same_association: bool
) -> tuple[int, dict[str, Any] | None]:
    """Take one Storage Commitment N-EVENT-REPORT (pynetdicom's EVT_N_EVENT_REPORT event):
    record its result in `spool` and return (status, the new record). Never raises.

    Statuses (PS3.7 10.1.1.1.8): 0x0000 recorded; 0x0113 No such event type (not 1 or 2);
    0x0115 Invalid argument value for a Transaction UID that is missing, unknown, or was
    asked of another AE title (its Event Information names no transaction of ours);
    0x0110 Processing failure when the record cannot be written.
    """
    # The reporting AE: the peer we called, or the one that called us.
    side = event.assoc.acceptor if same_association else event.assoc.requestor
    reporter = str(side.ae_title)
    try:
        request = event.request
        if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            return _NO_SUCH_EVENT_TYPE, None
        info = event.event_information
        report = parse_report(int(request.EventTypeID), info)
    except CommitmentError as exc:
        log.warning("refused a commitment report: %s", exc)
        code = _NO_SUCH_EVENT_TYPE if "event type" in str(exc) else _INVALID_ARGUMENT_VALUE
        return code, None
    except Exception:
        log.exception("cannot decode a commitment report")
        return _PROCESSING_FAILURE, None
    try:
        record = apply_report(
            spool, report, reported_by=reporter, same_association=same_association
        )
    except UnknownTransactionError as exc:
        log.warning("refused a commitment report from %s: %s", reporter, exc)
        return _INVALID_ARGUMENT_VALUE, None
    except OSError:
        log.exception("cannot record commitment transaction %s", report.transaction_uid)
        return _PROCESSING_FAILURE, None
    log.info(
        "commitment %s from %s: %d committed, %d failed",
        report.transaction_uid,
        reporter,
        len(report.committed),
        len(report.failed),
    )
    return _SUCCESS, record


def send_report(
    peer: DicomPeer,
    report: CommitmentReport,
    *,
    calling_aet: str,
    timeout: float = DEFAULT_TIMEOUT,
) -> int | None:
    """Deliver a Storage Commitment Result to `peer` (the requestor) on a new association
    (PS3.4 J.3.3.1.2), proposing the SCP role for the Push Model SOP class through SCP/SCU
    Role Selection Negotiation (PS3.7 D.3.3.4; PS3.4 J.3.3.1.3 note).

    Returns the N-EVENT-REPORT-RSP status, or None when there was no association or no
    response (nothing raised).
    """
    ae = _ae(calling_aet, timeout)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    received: list[Any] = []
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.aet,
        ext_neg=[role],
        evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: received.append(event.primitive))],
        tls_args=None if peer.tls is None else (peer.tls, peer.host),
    )
    if not assoc.is_established:
        log.warning(
            "cannot report commitment %s to %s: %s",
            report.transaction_uid,
            peer,
            _no_association(peer, received, timeout),
        )
        return None
    try:
        return send_report_on(assoc, report, calling_aet)
    finally:
        if assoc.is_established:
            assoc.release()


def send_report_on(assoc: Any, report: CommitmentReport, retrieve_aet: str) -> int | None:
    """Send `report` as an N-EVENT-REPORT on the established association `assoc`; its
    response status, or None when none came (or no context for it was accepted)."""
    try:
        status_ds, _reply = assoc.send_n_event_report(
            report_dataset(report, retrieve_aet),
            int(report.event_type),
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_INSTANCE,
        )
    except ValueError:  # no accepted presentation context for the SOP class
        log.warning("no Storage Commitment context to report %s on", report.transaction_uid)
        return None
    return int(status_ds.Status) if "Status" in status_ds else None


def _ae(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae
