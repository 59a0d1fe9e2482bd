"""The storage fast path (receiver.fast_store) against real peers: DCMTK, pynetdicom, raw PDUs.

Each test runs a worker's association server in this process (``build_server``, as the
worker does), so it can tell which path served an association (``FastStore.served``) and
compare the fast path with pynetdicom on the same input by switching the setting.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
)
from pynetdicom import AE, build_role
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from receiver_raw_scu import (
    RawAssociation,
    associate_rq,
    pdata,
    send_raw_c_store,
    store_command,
)
from receiver_support import (
    DCMTK_ENV,
    STORESCU_PROPOSE,
    Worker,
    dataset_bytes_of_file,
    pydicom_files_with_meta,
    sealed_instances,
    storescu_outcomes,
    wait_sealed,
)
from test_receiver_handlers import _broken_inputs  # the hostile inputs, shared

import receiver.app as app
from receiver.contexts import (
    MODALITY_WORKLIST_FIND,
    STORAGE_SOP_CLASSES,
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
)
from receiver.status import StoreStatus
from vannah_pipelines.dicom.synthetic import make_instance
from vannah_pipelines.dimse import pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
DEADLINE = 30.0  # bounds a hang, not a performance threshold


def _ct(**overrides: object) -> tuple[bytes, str]:
    """A small CT data set, explicit VR little endian, and its SOP Instance UID."""
    ds = make_instance("CT", rows=16, columns=16, **overrides)
    data = encode(ds, False, True)
    assert data is not None
    return data, str(ds.SOPInstanceUID)


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=DCMTK_ENV, capture_output=True, text=True, timeout=120, check=False
    )


# --------------------------------------------------------------------------- command sets


@pytest.mark.parametrize(
    ("status", "comment"),
    [(0x0000, ""), (0xA900, "invalid AffectedSOPInstanceUID"), (0xC000, "odd length")],
)
def test_store_response_matches_pynetdicoms_encoding(status: int, comment: str) -> None:
    request = pdu.parse_command(
        pdu.encode_request(pdu.C_STORE_RQ, 7, CT.encode(), b"1.2.3", has_data_set=True)
    )
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3"
    primitive.Status = status
    if comment:
        primitive.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (p_data,) = message.encode_msg(1, 16384)
    [(_context, pdv)] = p_data.presentation_data_value_list
    assert pdu.store_response(request, status, comment) == pdv[1:]


def test_echo_response_matches_pynetdicoms_encoding() -> None:
    request = pdu.parse_command(pdu.encode_request(pdu.C_ECHO_RQ, 3, VERIFICATION.encode()))
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = 3
    primitive.AffectedSOPClassUID = VERIFICATION
    primitive.Status = 0
    message = C_ECHO_RSP()
    message.primitive_to_message(primitive)
    (p_data,) = message.encode_msg(1, 16384)
    [(_context, pdv)] = p_data.presentation_data_value_list
    assert pdu.echo_response(request) == pdv[1:]


def test_parse_command_refuses_truncated_and_foreign_elements() -> None:
    command = pdu.encode_request(pdu.C_STORE_RQ, 1, CT.encode(), b"1.2.3", has_data_set=True)
    with pytest.raises(pdu.CommandError):
        pdu.parse_command(command[:-3])
    with pytest.raises(pdu.CommandError):
        pdu.parse_command(command + struct.pack("<HHL", 0x0008, 0x0018, 0))


# --------------------------------------------------------------------------- DCMTK peers


def _storescu_sets() -> dict[str, list[Path]]:
    """pydicom's test files of standard storage SOP classes, by transfer syntax."""
    sets: dict[str, list[Path]] = {}
    for path, ts in pydicom_files_with_meta().items():
        if ts not in STORESCU_PROPOSE:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sop_class = str(pydicom.dcmread(path, stop_before_pixels=True).get("SOPClassUID", ""))
        if sop_class in STORAGE_SOP_CLASSES:
            sets.setdefault(ts, []).append(path)
    return sets


def _storescu(port: int, ts: str, paths: list[Path], extra: list[str]) -> dict[str, str]:
    result = _run(
        [
            "storescu",
            "-v",
            "-nh",
            "-aet",
            "FASTSCU",
            *STORESCU_PROPOSE[ts],
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ]
    )
    return storescu_outcomes(result.stdout + result.stderr)


def _landed_data_sets(worker: Worker, count: int) -> list[bytes]:
    """Every landed data set, sorted, once `count` are sealed (re-sent UIDs land as
    versions, so this counts files, not UIDs)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        found = [item for items in sealed_instances(worker.data_dir).values() for item in items]
        if len(found) >= count:
            return sorted(item.dataset_bytes() for item in found)
        assert time.monotonic() < deadline, "acknowledged instances not sealed"
        time.sleep(0.1)


@pytest.mark.parametrize("extra", [[], ["--max-send-pdu", "4096"]], ids=["default-pdu", "4k-pdu"])
def test_fast_store_storescu_lands_pydicom_files_as_pynetdicom_does(
    start_worker: Callable[..., Worker], extra: list[str]
) -> None:
    """Every transfer syntax storescu can propose: same outcomes and same landed bytes as the
    pynetdicom path, byte-identical to the file wherever storescu sends the file's bytes."""
    fast = start_worker("fast")
    slow = start_worker("slow", receiver_fast_store=False)
    assert slow.server.fast_store is None
    sets = _storescu_sets()
    assert len(sets) >= 8, sets.keys()
    outcomes: dict[str, tuple[str, str]] = {}
    for ts, paths in sets.items():
        on_fast = _storescu(fast.port, ts, paths, extra)
        on_slow = _storescu(slow.port, ts, paths, extra)
        for path in paths:
            outcomes[str(path)] = (on_fast.get(str(path), "?"), on_slow.get(str(path), "?"))
    assert fast.fast.served == len(sets)
    assert all(f == s for f, s in outcomes.values()), outcomes
    succeeded = [Path(p) for p, (f, _s) in outcomes.items() if f == "success"]
    assert len(succeeded) >= 30, outcomes
    landed = _landed_data_sets(fast, len(succeeded))
    assert landed == _landed_data_sets(slow, len(succeeded))
    assert len(landed) == len(succeeded)
    identical = sum(dataset_bytes_of_file(path) in landed for path in succeeded)
    assert identical >= 20


def test_fast_store_echoscu_is_answered_on_the_fast_path(
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker()
    result = _run(["echoscu", "-v", "-aet", "ECHOFAST", "127.0.0.1", str(worker.port)])
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr
    assert worker.fast.served == 1


def test_fast_store_serves_c_find_and_leaves_retrieve_to_pynetdicom(
    start_worker: Callable[..., Worker],
) -> None:
    """C-FIND (findscu) takes the fast path; an association proposing C-MOVE does not."""
    worker = start_worker()
    result = _run(
        [
            "findscu",
            "-v",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
            "127.0.0.1",
            str(worker.port),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "Final Find Response (Success)" in result.stdout + result.stderr
    assert worker.fast.served == 1
    result = _run(
        [
            "movescu",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID=1.2.3.4",
            "127.0.0.1",
            str(worker.port),
        ]
    )
    assert "MoveDestinationUnknown" in result.stderr  # answered, by pynetdicom
    assert worker.fast.served == 1


def test_fast_store_serves_find_and_store_on_one_association(
    start_worker: Callable[..., Worker],
) -> None:
    """C-FIND (Study Root, worklist) and C-STORE on one fast-path association; answers as
    on pynetdicom's path (an empty archive: success, no match), then the release."""
    worker = start_worker()
    ae = AE(ae_title="FINDSTORE")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.add_requested_context(STUDY_ROOT_FIND)
    ae.add_requested_context(MODALITY_WORKLIST_FIND)
    assoc = ae.associate("127.0.0.1", worker.port, ae_title="VANNAHCLOUD")
    assert assoc.is_established
    try:
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        answers = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
        assert [int(status.Status) for status, _ in answers] == [0x0000]
        worklist = pydicom.Dataset()
        worklist.PatientID = ""
        answers = list(assoc.send_c_find(worklist, MODALITY_WORKLIST_FIND))
        assert [int(status.Status) for status, _ in answers] == [0x0000]
        ds = make_instance("CT", rows=16, columns=16)
        assert int(assoc.send_c_store(ds).Status) == StoreStatus.SUCCESS
    finally:
        assoc.release()
    assert worker.fast.served == 1


def test_parse_command_reads_c_find_and_c_cancel() -> None:
    """A C-CANCEL-RQ has no MessageID: it names the request it cancels (PS3.7 9.3.2.3)."""
    find = pdu.parse_command(pdu.encode_request(pdu.C_FIND_RQ, 3, STUDY_ROOT_FIND.encode()))
    assert (find.command_field, find.message_id) == (pdu.C_FIND_RQ, 3)
    cancel = pdu.parse_command(
        b"".join(
            [
                struct.pack("<HHL", 0, 0x0100, 2) + struct.pack("<H", pdu.C_CANCEL_RQ),
                struct.pack("<HHL", 0, 0x0120, 2) + struct.pack("<H", 3),
                struct.pack("<HHL", 0, 0x0800, 2) + struct.pack("<H", pdu.NO_DATA_SET),
            ]
        )
    )
    assert (cancel.command_field, cancel.responded_to, cancel.has_data_set) == (
        pdu.C_CANCEL_RQ,
        3,
        False,
    )


# --------------------------------------------------------------------------- pynetdicom peers


def test_fast_store_leaves_role_selection_to_pynetdicom(
    start_worker: Callable[..., Worker],
) -> None:
    """A C-GET style SCU (role selection for CT) is served by pynetdicom, storing works."""
    worker = start_worker()
    ae = AE(ae_title="ROLESCU")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1",
        worker.port,
        ae_title="VANNAHCLOUD",
        ext_neg=[build_role(CT, scu_role=True, scp_role=True)],
    )
    assert assoc.is_established
    ds = make_instance("CT", rows=16, columns=16)
    assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    assoc.release()
    assert worker.fast.served == 0
    assert str(ds.SOPInstanceUID) in wait_sealed(worker.data_dir, {str(ds.SOPInstanceUID)})


PROPOSALS: dict[str, list[tuple[int, str, list[str]]]] = {
    "explicit-preferred": [
        (1, CT, [JPEGBaseline8Bit, ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    ],
    "lossless-before-lossy": [(1, MR, [JPEGBaseline8Bit, JPEG2000Lossless, JPEGLSLossless])],
    "unsupported-syntax": [(1, CT, ["1.2.3.4.5"]), (3, MR, [ImplicitVRLittleEndian])],
    "verification-big-endian": [(1, VERIFICATION, [ExplicitVRBigEndian])],
    "verification-jpeg-rejected": [
        (5, VERIFICATION, [JPEGBaseline8Bit]),
        (7, CT, [JPEGLSLossless]),
    ],
    "same-class-twice": [
        (1, CT, [ImplicitVRLittleEndian]),
        (3, CT, [ExplicitVRLittleEndian, JPEGBaseline8Bit]),
        (5, CT, [JPEGBaseline8Bit]),
    ],
}


@pytest.mark.parametrize("name", list(PROPOSALS))
def test_fast_store_answers_the_same_a_associate_ac_as_pynetdicom(
    start_worker: Callable[..., Worker], name: str
) -> None:
    """The whole A-ASSOCIATE-AC PDU, byte for byte, whichever path answers (the fast
    path's second answer to the same request is the one it remembered)."""
    fast = start_worker("fast")
    slow = start_worker("slow", receiver_fast_store=False)
    request = associate_rq(PROPOSALS[name], max_pdu=16384, calling_ae="NEGOSCU")
    answers = []
    for worker in (fast, fast, slow):
        raw = RawAssociation("127.0.0.1", worker.port)
        pdu_type, answer = raw.associate(request)
        assert pdu_type == pdu.A_ASSOCIATE_AC
        answers.append(answer)
        assert raw.release() == pdu.A_RELEASE_RP
        raw.close()
    assert fast.fast.served == 2
    assert answers[0] == answers[1] == answers[2]


def test_fast_store_negotiates_like_pynetdicom_for_a_pynetdicom_scu(
    start_worker: Callable[..., Worker],
) -> None:
    fast = start_worker("fast")
    slow = start_worker("slow", receiver_fast_store=False)
    ae = AE(ae_title="NEGOPYN")
    ae.add_requested_context(CT, [JPEGBaseline8Bit, ExplicitVRLittleEndian])
    ae.add_requested_context(MR, [ImplicitVRLittleEndian, JPEGLSLossless])
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", [JPEGBaseline8Bit])
    accepted = []
    for worker in (fast, slow):
        assoc = ae.associate("127.0.0.1", worker.port, ae_title="VANNAHCLOUD")
        assert assoc.is_established
        accepted.append(
            [
                (cx.context_id, cx.abstract_syntax, cx.transfer_syntax[0], cx.result)
                for cx in assoc.accepted_contexts + assoc.rejected_contexts
            ]
        )
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    assert fast.fast.served == 1
    assert accepted[0] == accepted[1]
    assert (1, CT, ExplicitVRLittleEndian, 0) in accepted[0]


# --------------------------------------------------------------------------- raw PDUs


@pytest.mark.parametrize(
    ("name", "sop_class", "sop_instance", "data", "statuses"),
    _broken_inputs(),
    ids=[c[0] for c in _broken_inputs()],
)
def test_fast_store_refuses_broken_input_as_pynetdicom_does(
    start_worker: Callable[..., Worker],
    name: str,
    sop_class: str,
    sop_instance: str,
    data: bytes,
    statuses: set[int],
) -> None:
    fast = start_worker("fast")
    slow = start_worker("slow", receiver_fast_store=False)
    results = [
        send_raw_c_store(
            "127.0.0.1",
            worker.port,
            sop_class=sop_class,
            sop_instance=sop_instance,
            transfer_syntax=ExplicitVRLittleEndian,
            dataset=data,
        )
        for worker in (fast, slow)
    ]
    assert fast.fast.served == 1
    assert results[0] == results[1]
    assert results[0].status in statuses
    fast.wait_idle()
    assert fast.landed() == []


def _associate_ct(worker: Worker, max_pdu: int = 0) -> RawAssociation:
    raw = RawAssociation("127.0.0.1", worker.port)
    pdu_type, _answer = raw.associate(
        associate_rq([(1, CT, [ExplicitVRLittleEndian])], max_pdu=max_pdu)
    )
    assert pdu_type == pdu.A_ASSOCIATE_AC
    return raw


def test_fast_store_reassembles_commands_and_data_sets_split_over_pdvs_and_pdus(
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker()
    raw = _associate_ct(worker)
    sent: dict[str, bytes] = {}
    # 1: the command in two PDUs, the data set in 97-byte PDVs, five per PDU.
    data, uid = _ct()
    command = store_command(CT, uid, 1)
    raw.send(pdata([(1, 0x01, command[:10])]))
    raw.send(pdata([(1, 0x03, command[10:])]))
    pieces = [data[i : i + 97] for i in range(0, len(data), 97)]
    pdvs = [(1, 0x02 if i == len(pieces) - 1 else 0x00, p) for i, p in enumerate(pieces)]
    for i in range(0, len(pdvs), 5):
        raw.send(pdata(pdvs[i : i + 5]))
    assert raw.command_status() == StoreStatus.SUCCESS
    sent[uid] = data
    # 2: both command fragments and the whole data set in one PDU, with an empty PDV.
    data, uid = _ct()
    command = store_command(CT, uid, 2)
    raw.send(
        pdata(
            [
                (1, 0x01, command[:31]),
                (1, 0x03, command[31:]),
                (1, 0x00, data[:1000]),
                (1, 0x00, b""),
                (1, 0x02, data[1000:]),
            ]
        )
    )
    assert raw.command_status() == StoreStatus.SUCCESS
    sent[uid] = data
    assert raw.release() == pdu.A_RELEASE_RP
    raw.close()
    landed = wait_sealed(worker.data_dir, set(sent))
    for uid, data in sent.items():
        assert [item.dataset_bytes() for item in landed[uid]] == [data]
    assert worker.fast.served == 1


def test_fast_store_respects_the_peers_maximum_pdu_length(
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker()
    raw = _associate_ct(worker, max_pdu=40)
    data, uid = _ct()
    raw.send(pdata([(1, 0x03, store_command(CT, uid)), (1, 0x02, data)]))
    command = b""
    while True:
        pdu_type, body = raw.recv_pdu()
        assert pdu_type == pdu.P_DATA_TF
        assert len(body) <= 40
        length, _cx, flags = struct.unpack_from(">LBB", body)
        assert length + 4 == len(body)
        command += body[6:]
        if flags & 0x02:
            break
    assert pdu.store_response(
        pdu.parse_command(store_command(CT, uid)), StoreStatus.SUCCESS
    ) == bytes(command)
    assert raw.release() == pdu.A_RELEASE_RP
    raw.close()


@pytest.mark.parametrize("ending", ["a-abort", "close"])
def test_fast_store_lands_nothing_from_an_association_ended_mid_data_set(
    start_worker: Callable[..., Worker], ending: str
) -> None:
    worker = start_worker()
    raw = _associate_ct(worker)
    data, uid = _ct()
    raw.send(pdata([(1, 0x03, store_command(CT, uid)), (1, 0x00, data[: len(data) // 2])]))
    if ending == "a-abort":
        raw.abort()
    raw.close()
    worker.wait_idle()
    assert worker.landed() == []
    # The worker goes on serving.
    result = send_raw_c_store(
        "127.0.0.1",
        worker.port,
        sop_class=CT,
        sop_instance=uid,
        transfer_syntax=ExplicitVRLittleEndian,
        dataset=data,
    )
    assert result.status == StoreStatus.SUCCESS
    assert worker.fast.served == 2


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(
            lambda: pdata([(3, 0x03, store_command(CT, "1.2.3"))]), id="unaccepted-context"
        ),
        pytest.param(
            lambda: pdata(
                [(1, 0x03, pdu.encode_request(0x0020, 1, CT.encode(), has_data_set=True))]
            ),
            id="c-find-on-storage-context",
        ),
        pytest.param(lambda: pdata([(1, 0x02, b"\x00" * 8)]), id="data-set-without-command"),
        pytest.param(lambda: pdata([(1, 0x03, b"\x00\x00\x00")]), id="garbled-command"),
        pytest.param(lambda: struct.pack(">BBL", 0x09, 0, 0), id="unknown-pdu"),
        pytest.param(lambda: associate_rq([(1, CT, [ExplicitVRLittleEndian])]), id="second-rq"),
    ],
)
def test_fast_store_aborts_an_association_on_protocol_errors(
    start_worker: Callable[..., Worker], message: Callable[[], bytes]
) -> None:
    worker = start_worker()
    raw = _associate_ct(worker)
    raw.send(message())
    rest = raw.read_until_closed()
    raw.close()
    assert rest[:1] == bytes([pdu.A_ABORT])
    worker.wait_idle()
    assert worker.landed() == []


def test_fast_store_rejects_past_max_associations_counting_both_paths(
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker(max_associations=2)
    held_fast = _associate_ct(worker)
    finder = AE(ae_title="HELDMOVE")
    finder.add_requested_context(STUDY_ROOT_MOVE)  # C-MOVE: served by pynetdicom
    held_slow = finder.associate("127.0.0.1", worker.port, ae_title="VANNAHCLOUD")
    assert held_slow.is_established
    # A third association is rejected on either path: transient, local limit exceeded.
    raw = RawAssociation("127.0.0.1", worker.port)
    pdu_type, answer = raw.associate(associate_rq([(1, CT, [ExplicitVRLittleEndian])]))
    raw.close()
    assert (pdu_type, answer[7:10]) == (pdu.A_ASSOCIATE_RJ, bytes([2, 3, 2]))
    refused = finder.associate("127.0.0.1", worker.port, ae_title="VANNAHCLOUD")
    assert refused.is_rejected
    assert worker.fast.served == 1
    # Once one ends, a new one is accepted.
    assert held_fast.release() == pdu.A_RELEASE_RP
    held_fast.close()
    deadline = time.monotonic() + DEADLINE
    while worker.fast.running():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    again = _associate_ct(worker)
    assert again.release() == pdu.A_RELEASE_RP
    again.close()
    held_slow.release()


def test_fast_store_associations_are_aborted_by_the_workers_drain(
    start_worker: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = start_worker()
    raw = _associate_ct(worker)
    data, uid = _ct()
    raw.send(pdata([(1, 0x03, store_command(CT, uid)), (1, 0x00, data[:100])]))
    deadline = time.monotonic() + DEADLINE
    while not worker.fast.running():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(worker.server.running_associations()) == 1
    monkeypatch.setattr(app, "DRAIN_SECONDS", 0.2)
    app._drain(worker.server)
    assert worker.server.running_associations() == []
    assert raw.read_until_closed()[:1] == bytes([pdu.A_ABORT])
    raw.close()
    assert worker.landed() == []


def test_fast_store_closes_a_port_probe_without_an_association(
    start_worker: Callable[..., Worker],
) -> None:
    """A connection closed before its first byte (a readiness probe such as `vannah up`'s)
    holds no association afterwards, so a stopping worker does not wait its drain for it
    (handed to pynetdicom, it stayed running until the ACSE timeout)."""
    worker = start_worker("fast")
    socket.create_connection(("127.0.0.1", worker.port)).close()
    deadline = time.monotonic() + DEADLINE
    while not worker.server.last_connection:
        assert time.monotonic() < deadline, "the connection was never accepted"
        time.sleep(0.01)
    time.sleep(0.5)  # a handed-off connection would be a running association by now
    assert worker.server.running_associations() == []
    assert worker.fast.served == 0


def test_fast_store_hands_an_unreadable_request_to_pynetdicom_untouched(
    start_worker: Callable[..., Worker],
) -> None:
    """Garbage instead of an A-ASSOCIATE-RQ: pynetdicom answers it as it always did."""
    fast = start_worker("fast")
    slow = start_worker("slow", receiver_fast_store=False)
    answers = []
    for worker in (fast, slow):
        raw = RawAssociation("127.0.0.1", worker.port)
        raw.send(b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16)
        answers.append(raw.read_until_closed())
        raw.close()
    assert fast.fast.served == 0
    assert answers[0] == answers[1]
