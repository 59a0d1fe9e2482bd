"""The Query/Retrieve and worklist C-FIND, C-GET and C-MOVE handlers (PS3.4 C, K).

Imported on the first such request (``receiver.handlers.event_handlers``): the catalog
stack they need (DuckDB, pyarrow) is not loaded by a worker that only stores. No handler
lets an exception escape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from receiver.archive import Archive
from receiver.contexts import MODALITY_WORKLIST_FIND
from receiver.query_retrieve import (
    ParsedIdentifier,
    QueryRefusedError,
    find,
    match_instances,
    parse_identifier,
)
from receiver.responses import EncodedIdentifier, failure
from receiver.retrieve import RetrievePlan, SubOperation
from receiver.status import FindStatus, RetrieveStatus
from receiver.worklist import handle_worklist_find
from vannah_pipelines.dimse.peers import DicomPeer
from vannah_pipelines.storage.tiers import ReadAhead

log = logging.getLogger(__name__)


def _identifier(event: Event, *, retrieve: bool) -> ParsedIdentifier:
    sop_class = str(event.request.AffectedSOPClassUID)
    try:
        identifier = event.identifier
    except Exception as exc:
        raise QueryRefusedError(
            FindStatus.UNABLE_TO_PROCESS, "identifier cannot be decoded"
        ) from exc
    return parse_identifier(identifier, sop_class, retrieve=retrieve)


def handle_find(
    event: Event, archive: Archive
) -> Iterator[tuple[int | Dataset, Dataset | dict[str, Any] | EncodedIdentifier | None]]:
    """EVT_C_FIND: Patient Root / Study Root C-FIND through the shared query engine, each
    answer as DICOM JSON (``receiver.retrieve.ArchiveQueryRetrieveService`` encodes it);
    worklist answers as Datasets (pynetdicom's worklist service encodes them).

    Yields one pending status per match (0xFF01 when a key with a value could not be
    matched), then success; 0xFE00 once a C-CANCEL arrives; 0xA900 / 0xC000 with an
    Error Comment for an identifier that cannot be answered.
    """
    if str(event.request.AffectedSOPClassUID) == MODALITY_WORKLIST_FIND:
        # pynetdicom binds one C-FIND handler: Modality Worklist goes to its own.
        yield from handle_worklist_find(
            event,
            archive.worklist,
            archive.worklist_past_due_hours,
            remembered=archive.worklist_answers,
        )
        return
    calling_ae = event.assoc.requestor.ae_title
    try:
        parsed = _identifier(event, retrieve=False)
        answers = find(archive.catalog, parsed, archive.aet)
    except QueryRefusedError as exc:
        log.info("refused C-FIND from %s: 0x%04X %s", calling_ae, exc.status, exc.comment)
        yield failure(exc.status, exc.comment), None
        return
    except Exception:
        log.exception("C-FIND failed unexpectedly")
        yield failure(FindStatus.UNABLE_TO_PROCESS, "internal error"), None
        return
    log.info("C-FIND from %s at %s level: %d matches", calling_ae, parsed.level, answers.count)
    pending = FindStatus.PENDING_WARNING if answers.unsupported else FindStatus.PENDING
    if answers.unsupported:
        log.info("C-FIND keys not matched: %s", ", ".join(answers.unsupported))
    for sent, identifier in enumerate(answers.identifiers):
        if event.is_cancelled:
            log.info("C-FIND from %s cancelled after %d matches", calling_ae, sent)
            yield int(FindStatus.CANCEL), None
            return
        yield int(pending), identifier  # DICOM JSON: see ArchiveQueryRetrieveService
    yield int(FindStatus.SUCCESS), None


def _retrieve_plan(event: Event, archive: Archive, *, move: bool) -> RetrievePlan:
    calling_ae = event.assoc.requestor.ae_title
    destination: DicomPeer | None = None
    if move:
        request: Any = event.request
        aet = str(request.MoveDestination or "").strip()
        known = archive.destination(aet)
        if known is None:
            log.info("C-MOVE from %s to unknown destination %s", calling_ae, aet)
            return RetrievePlan.refuse(
                RetrieveStatus.MOVE_DESTINATION_UNKNOWN, "move destination unknown"
            )
        tls = archive.client_tls() if known.use_dicom_tls else None
        destination = DicomPeer(known.aet, known.host, known.port, tls)
    try:
        parsed = _identifier(event, retrieve=True)
        instances = match_instances(archive.catalog, parsed)
    except QueryRefusedError as exc:
        log.info("refused retrieve from %s: 0x%04X %s", calling_ae, exc.status, exc.comment)
        return RetrievePlan.refuse(RetrieveStatus(exc.status), exc.comment)
    # Each instance's bytes are opened when its sub-operation runs, from whatever tier holds
    # them: one that cannot be read (archived, a tier down) fails that sub-operation.
    tiers = archive.tiers
    openers: list[Callable[[], BinaryIO]] = [partial(tiers.open_instance, i) for i in instances]
    ahead: ReadAhead | None = None
    if any(tiers.is_remote(inst.tier) for inst in instances):
        # Object storage: the next instances are fetched while one is sent.
        ahead = ReadAhead(openers)
        openers = [ahead.opener(n) for n in range(len(openers))]
    subops = [
        SubOperation(
            inst.sop_class_uid, inst.sop_instance_uid, inst.transfer_syntax_uid, open_stream
        )
        for inst, open_stream in zip(instances, openers, strict=True)
    ]
    log.info(
        "%s from %s at %s level: %d instances%s",
        "C-MOVE" if move else "C-GET",
        calling_ae,
        parsed.level,
        len(subops),
        f" to {destination.aet}" if destination else "",
    )
    return RetrievePlan(subops, destination, release=ahead.close if ahead else None)


def handle_get(event: Event, archive: Archive) -> RetrievePlan:
    """EVT_C_GET: the instances to send back on this association (see receiver.retrieve)."""
    return _plan_or_refusal(event, archive, move=False)


def handle_move(event: Event, archive: Archive) -> RetrievePlan:
    """EVT_C_MOVE: the known destination and the instances to send it (see receiver.retrieve)."""
    return _plan_or_refusal(event, archive, move=True)


def _plan_or_refusal(event: Event, archive: Archive, *, move: bool) -> RetrievePlan:
    try:
        return _retrieve_plan(event, archive, move=move)
    except Exception:
        log.exception("%s failed unexpectedly", "C-MOVE" if move else "C-GET")
        return RetrievePlan.refuse(RetrieveStatus.UNABLE_TO_PROCESS, "internal error")
