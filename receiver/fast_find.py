"""C-FIND (Query/Retrieve and Modality Worklist) on the fast path (``receiver.fast_store``).

A modality's worklist query or a viewer's study search is one short association: through
pynetdicom, its negotiation, request and release pass between three threads polling with
1 ms sleeps, more than the query itself on a small archive. The fast path serves them on
the connection's thread instead, through the very handlers pynetdicom calls
(:func:`receiver.handlers.run_query_retrieve`, so the same read-role check, audit counts,
statuses and identifiers) and the same answer loop (:func:`receiver.retrieve.answer_find`);
this module is the stand-in for the pynetdicom ``Event`` those handlers read.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from receiver.archive import Archive
from receiver.contexts import MODALITY_WORKLIST_FIND, PATIENT_ROOT_FIND, STUDY_ROOT_FIND
from receiver.handlers import AssociationLog, run_query_retrieve
from receiver.retrieve import FindRespond, answer_find
from vannah_pipelines.dimse import pdu
from vannah_pipelines.security.principal import Principal

FIND_SOP_CLASSES = frozenset({PATIENT_ROOT_FIND, STUDY_ROOT_FIND, MODALITY_WORKLIST_FIND})
MAX_IDENTIFIER_BYTES = 1 << 20  # a larger C-FIND identifier aborts the association


class FindRequest:
    """What the handlers read of pynetdicom's C-FIND-RQ primitive."""

    def __init__(self, command: pdu.Command) -> None:
        self.AffectedSOPClassUID = UID(command.affected_sop_class_uid.decode("ascii", "replace"))
        self.MessageID = command.message_id
        self.Priority = command.priority


class Requestor:
    """The requesting AE, as ``event.assoc.requestor``."""

    def __init__(self, ae_title: str) -> None:
        self.ae_title = ae_title


class Requesting:
    """The association, as ``event.assoc`` (the handlers read the requestor's AE title)."""

    def __init__(self, ae_title: str) -> None:
        self.requestor = Requestor(ae_title)


class FindEvent:
    """Stand-in for pynetdicom's EVT_C_FIND ``Event``: ``request``, ``identifier`` (decoded
    on first use, in the context's transfer syntax), ``is_cancelled`` and
    ``assoc.requestor.ae_title``."""

    def __init__(
        self,
        command: pdu.Command,
        identifier: bytes,
        syntax: UID,
        calling_ae: str,
        cancelled: Callable[[int], bool],
    ) -> None:
        self.request = FindRequest(command)
        self.assoc = Requesting(calling_ae)
        self._data = identifier
        self._syntax = syntax
        self._cancelled = cancelled
        self._identifier: Dataset | None = None

    @property
    def identifier(self) -> Dataset:
        if self._identifier is None:
            syntax = self._syntax
            self._identifier = decode(
                BytesIO(self._data),
                syntax.is_implicit_VR,
                syntax.is_little_endian,
                syntax.is_deflated,
            )
        return self._identifier

    @property
    def identifier_bytes(self) -> bytes:
        """The identifier as received (its key in ``receiver.worklist.WorklistAnswers``)."""
        return self._data

    @property
    def syntax(self) -> UID:
        """The transfer syntax of the request's presentation context."""
        return self._syntax

    @property
    def is_cancelled(self) -> bool:
        """Whether a C-CANCEL-RQ for this request has arrived (checked without waiting)."""
        return self._cancelled(self.request.MessageID)


def serve_find(
    event: FindEvent,
    respond: FindRespond,
    *,
    archive: Archive,
    associations: AssociationLog,
    assoc_id: int,
    principal: Principal | None,
    established: Callable[[], bool],
) -> None:
    """Answer one C-FIND as the pynetdicom path does: the EVT_C_FIND handler
    (:func:`receiver.handlers.run_query_retrieve`) through :func:`answer_find`."""

    def answers() -> Any:
        return run_query_retrieve("handle_find", event, archive, associations, assoc_id, principal)

    answer_find(answers, respond, event._syntax, established)
