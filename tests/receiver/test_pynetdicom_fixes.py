"""The reactor-race fix puts a stolen response back where the waiting sender finds it."""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from receiver import pynetdicom_fixes


def _response(message_id: int) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.Status = 0x0000
    return rsp


def test_response_taken_by_the_reactor_while_a_sender_waits_goes_back_first() -> None:
    pynetdicom_fixes.install()
    assoc = Association(AE(), "requestor")
    later = _response(2)
    assoc.dimse.msg_queue.put((1, later))
    assoc._reactor_checkpoint.clear()  # a send_* paused the reactor and waits for its answer
    stolen = _response(1)
    assoc._serve_request(stolen, 1)
    assert assoc.dimse.get_msg(block=False) == (1, stolen)
    assert assoc.dimse.get_msg(block=False) == (1, later)


def test_unexpected_response_with_no_sender_waiting_is_still_dropped() -> None:
    pynetdicom_fixes.install()
    assoc = Association(AE(), "requestor")
    assert assoc._reactor_checkpoint.is_set()
    assoc._serve_request(_response(1), 1)
    assert assoc.dimse.get_msg(block=False) == (None, None)


def test_requests_are_not_requeued() -> None:
    pynetdicom_fixes.install()
    assoc = Association(AE(), "requestor")
    assoc._reactor_checkpoint.clear()
    request = C_ECHO()
    request.MessageID = 1
    request.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert request.is_valid_request
    assoc._serve_request(request, 1)  # handled by pynetdicom (no context: answered or logged)
    assert assoc.dimse.get_msg(block=False) == (None, None)
