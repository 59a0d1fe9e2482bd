"""The receiver's Storage Commitment N-ACTION and N-EVENT-REPORT statuses, on an in-process
worker with a pynetdicom SCU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role
from receiver_support import Worker

import receiver.commitment as commitment
from vannah_pipelines.routing.commitments import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentRequest,
    request_dataset,
)

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def assoc_to(start_worker: Callable[..., Worker]) -> Iterator[Callable[..., Any]]:
    opened: list[Any] = []

    def open_assoc(scp_role: bool = False) -> Any:
        worker = start_worker("pynetdicom")
        ae = AE(ae_title="ROUTER")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        ext = [build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)]
        assoc = ae.associate(
            "127.0.0.1", worker.port, ae_title="VANNAHCLOUD", ext_neg=ext if scp_role else []
        )
        assert assoc.is_established
        opened.append(assoc)
        return assoc

    yield open_assoc
    for assoc in opened:
        if assoc.is_established:
            assoc.release()


def _action(assoc: Any, ds: Dataset, action_type: int = 1) -> int:
    status, _reply = assoc.send_n_action(
        ds, action_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
    )
    return int(status.Status)


def test_n_action_statuses(assoc_to: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commitment, "MAX_REFERENCES", 2)
    assoc = assoc_to()
    refs = tuple((CT, generate_uid()) for _ in range(3))
    too_many = request_dataset(CommitmentRequest(generate_uid(), refs))
    assert _action(assoc, too_many) == 0x0213  # Resource limitation
    no_transaction = request_dataset(CommitmentRequest(generate_uid(), refs[:1]))
    del no_transaction.TransactionUID
    assert _action(assoc, no_transaction) == 0x0115  # Invalid argument value
    ok = request_dataset(CommitmentRequest(generate_uid(), refs[:2]))
    assert _action(assoc, ok, action_type=2) == 0x0123  # No such action


def test_n_event_report_for_an_unknown_transaction_is_an_invalid_argument(
    assoc_to: Callable[..., Any],
) -> None:
    assoc = assoc_to(scp_role=True)
    info = Dataset()
    info.TransactionUID = generate_uid()
    status, _reply = assoc.send_n_event_report(
        info, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
    )
    assert int(status.Status) == 0x0115
    status, _reply = assoc.send_n_event_report(
        info, 7, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
    )
    assert int(status.Status) == 0x0113  # No such event type
