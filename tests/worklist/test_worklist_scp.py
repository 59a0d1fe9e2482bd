"""The MWL SCP against real peers (findscu -W, pynetdicom SCU) and the handler's statuses."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE

from receiver.contexts import MODALITY_WORKLIST_FIND
from receiver.status import WorklistFindStatus
from receiver.worklist import handle_worklist_find
from tests.worklist.conftest import findscu, needs_dcmtk, step_fields
from vannah_pipelines.worklist.model import StepStatus, item_from_fields
from vannah_pipelines.worklist.store import WorklistStore


def _seed(store: WorklistStore) -> None:
    store.upsert(
        [
            item_from_fields(step_fields()),
            item_from_fields(
                step_fields(
                    step_id="SPS2",
                    accession_number="ACC002",
                    modality="MR",
                    patient_name="ROE^RICHARD",
                    patient_id="PID002",
                    scheduled_station_ae_title="MR01",
                )
            ),
        ],
        "test",
    )


@needs_dcmtk
def test_product_example_query_works_as_written(
    store: WorklistStore, mwl_scp: Any, tmp_path: Path
) -> None:
    _seed(store)
    port = mwl_scp(store)
    # PRODUCT.md's example, adapted only for host and port (no -aec: any called AE is fine).
    got, proc = findscu(
        port,
        tmp_path / "out",
        "-k",
        "ScheduledProcedureStepSequence",
        "-k",
        "PatientName",
        "-k",
        "PatientID",
        "-k",
        "AccessionNumber",
        "-k",
        "Modality=CT",
        aec=None,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(got) == 1
    ds = got[0]
    assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == (
        "DOE^JANE",
        "PID001",
        "ACC001",
    )
    assert ds.Modality == "CT"
    sps = ds.ScheduledProcedureStepSequence[0]
    assert (sps.Modality, sps.ScheduledStationAETitle, sps.ScheduledProcedureStepID) == (
        "CT",
        "CT01",
        "SPS1",
    )


def _c_find(port: int, identifier: Dataset) -> list[tuple[int, Dataset | None]]:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MODALITY_WORKLIST_FIND)
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established
    try:
        return [
            (int(status.Status), ident)
            for status, ident in assoc.send_c_find(identifier, MODALITY_WORKLIST_FIND)
        ]
    finally:
        assoc.release()


def _query(**sps_keys: str) -> Dataset:
    q = Dataset()
    q.PatientName = ""
    q.AccessionNumber = ""
    item = Dataset()
    item.Modality = ""
    item.ScheduledStationAETitle = ""
    item.ScheduledProcedureStepStartDate = ""
    for k, v in sps_keys.items():
        setattr(item, k, v)
    q.ScheduledProcedureStepSequence = Sequence([item])
    return q


def test_sps_matching_date_range_modality_station_and_name_wildcard(
    store: WorklistStore, mwl_scp: Any
) -> None:
    _seed(store)
    port = mwl_scp(store)
    today = datetime.now().strftime("%Y%m%d")
    tomorrow = (datetime.now() + timedelta(days=1)).strftime("%Y%m%d")

    def accessions(q: Dataset) -> list[str]:
        answers = _c_find(port, q)
        assert answers[-1][0] == 0x0000
        assert all(s == 0xFF00 for s, _ in answers[:-1])
        return sorted(str(i.AccessionNumber) for _, i in answers[:-1] if i is not None)

    assert accessions(_query(ScheduledProcedureStepStartDate=f"{today}-{tomorrow}")) == [
        "ACC001",
        "ACC002",
    ]
    assert accessions(_query(ScheduledProcedureStepStartDate=f"{tomorrow}-")) == []
    assert accessions(_query(Modality="MR")) == ["ACC002"]
    assert accessions(_query(ScheduledStationAETitle="CT01")) == ["ACC001"]
    q = _query()
    q.PatientName = "ROE*"
    assert accessions(q) == ["ACC002"]
    # Only requested item keys come back.
    answers = _c_find(port, _query(Modality="CT"))
    sps = answers[0][1].ScheduledProcedureStepSequence[0]  # type: ignore[union-attr]
    assert set(sps.dir()) == {
        "Modality",
        "ScheduledProcedureStepStartDate",
        "ScheduledStationAETitle",
    }


def test_closed_and_past_due_steps_are_not_returned(store: WorklistStore, mwl_scp: Any) -> None:
    _seed(store)
    old = (datetime.now() - timedelta(days=3)).strftime("%Y%m%d")
    store.create(
        item_from_fields(
            step_fields(
                step_id="OLD", accession_number="ACC003", scheduled_procedure_step_start_date=old
            )
        ),
        "test",
    )
    store.set_status("SPS2", StepStatus.COMPLETED, "test")
    port = mwl_scp(store, past_due_hours=24)
    answers = _c_find(port, _query())
    assert sorted(str(i.AccessionNumber) for _, i in answers if i is not None) == ["ACC001"]


def test_malformed_identifier_is_a900_and_nothing_changes(
    store: WorklistStore, mwl_scp: Any
) -> None:
    _seed(store)
    before = [i.to_json() for i in store.items()]
    port = mwl_scp(store)
    answers = _c_find(port, _query(ScheduledProcedureStepStartDate="2024-13-99x"))
    assert [s for s, _ in answers] == [WorklistFindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS]
    bad = _query()
    bad.StudyInstanceUID = "not.a.uid"
    assert [s for s, _ in _c_find(port, bad)] == [0xA900]
    assert [i.to_json() for i in store.items()] == before


class _Undecodable:
    def decode(self) -> None:
        raise ValueError("garbage")


def test_undecodable_identifier_is_c000(store: WorklistStore) -> None:
    event = SimpleNamespace(identifier=_Undecodable(), is_cancelled=False, assoc=None)
    ((status, ident),) = list(handle_worklist_find(event, store))
    assert isinstance(status, Dataset) and status.Status == 0xC000 and ident is None


def test_c_cancel_stops_with_fe00(store: WorklistStore) -> None:
    _seed(store)
    flags = iter([False, True, True])

    class Event:
        identifier = _query()
        assoc = None

        @property
        def is_cancelled(self) -> bool:
            return next(flags)

    event = Event()
    statuses = [int(s) for s, _ in handle_worklist_find(event, store)]
    assert statuses == [0xFF00, 0xFE00]


@needs_dcmtk
def test_findscu_cancel_after_one(store: WorklistStore, mwl_scp: Any, tmp_path: Path) -> None:
    _seed(store)
    port = mwl_scp(store)
    got, proc = findscu(
        port,
        tmp_path / "out",
        "--cancel",
        "1",
        "-k",
        "ScheduledProcedureStepSequence",
        "-k",
        "AccessionNumber",
    )
    # The SCP may have sent both answers before the C-CANCEL arrives; the association
    # must end cleanly either way.
    assert proc.returncode == 0, proc.stderr
    assert 1 <= len(got) <= 2


@pytest.mark.parametrize("past_due_hours", [0.0])
def test_step_without_time_is_visible_on_its_day(past_due_hours: float) -> None:
    item = item_from_fields(step_fields(scheduled_procedure_step_start_time=None))
    assert item.visible(datetime.now(), past_due_hours)


def _fast_event(identifier: bytes, cancelled: Any = lambda _id: False) -> Any:
    from pydicom.uid import UID

    from receiver.fast_find import FindEvent
    from vannah_pipelines.dimse import pdu

    command = pdu.Command(
        command_field=pdu.C_FIND_RQ,
        message_id=1,
        has_data_set=True,
        affected_sop_class_uid=MODALITY_WORKLIST_FIND.encode(),
    )
    return FindEvent(command, identifier, UID("1.2.840.10008.1.2.1"), "SCU", cancelled)


def _answer_bytes(answers: list[Any]) -> list[tuple[int, bytes | None]]:
    from pydicom.uid import UID

    from receiver.retrieve import _encode_identifier, _status_and_comment

    syntax = UID("1.2.840.10008.1.2.1")
    return [
        (_status_and_comment(s)[0], None if i is None else _encode_identifier(i, syntax))
        for s, i in answers
    ]


def test_remembered_answers_are_the_answers(store: WorklistStore) -> None:
    """The fast path's remembered MWL answers: the same statuses and bytes as answering
    afresh, on the first query and the next ones, and a changed step is answered anew."""
    from pynetdicom.dsutils import encode

    from receiver.responses import EncodedIdentifier
    from receiver.worklist import WorklistAnswers

    _seed(store)
    memory = WorklistAnswers()
    raw = encode(_query(), False, True)
    assert raw is not None

    def both() -> tuple[list[Any], list[Any]]:
        fresh = list(handle_worklist_find(_fast_event(raw), store))
        kept = list(handle_worklist_find(_fast_event(raw), store, remembered=memory))
        return fresh, kept

    for _ in range(2):
        fresh, kept = both()
        assert _answer_bytes(kept) == _answer_bytes(fresh)
        assert [int(s) for s, _ in kept] == [0xFF00, 0xFF00, 0x0000]
        assert all(isinstance(i, EncodedIdentifier) for _, i in kept[:-1])
    (first,) = [i for i in store.items() if i.step_id == "SPS1"]
    store.upsert([first.with_status(StepStatus.DISCONTINUED)], "test")  # no longer visible
    fresh, kept = both()
    assert _answer_bytes(kept) == _answer_bytes(fresh)
    assert [int(s) for s, _ in kept] == [0xFF00, 0x0000]
    # Bytes cut short, and a malformed query: the same answers, the failure never remembered.
    malformed = encode(_query(ScheduledProcedureStepStartDate="2024-13-99x"), False, True)
    truncated = b"\x08\x00\x50\x00SH\x10\x00AB"  # a 16-byte value, 2 bytes sent
    for bad in (truncated, malformed):
        assert bad is not None
        for _ in range(2):
            got = list(handle_worklist_find(_fast_event(bad), store, remembered=memory))
            assert _answer_bytes(got) == _answer_bytes(
                list(handle_worklist_find(_fast_event(bad), store))
            )
    assert [int(s) for s, _ in _answer_bytes(got)] == [0xA900]  # the malformed one


def test_remembered_answers_stop_at_c_cancel(store: WorklistStore) -> None:
    from pynetdicom.dsutils import encode

    from receiver.worklist import WorklistAnswers

    _seed(store)
    raw = encode(_query(), False, True)
    assert raw is not None
    flags = iter([False, True, True])
    event = _fast_event(raw, lambda _id: next(flags))
    got = [int(s) for s, _ in handle_worklist_find(event, store, remembered=WorklistAnswers())]
    assert got == [0xFF00, 0xFE00]
