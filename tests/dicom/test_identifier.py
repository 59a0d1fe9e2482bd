"""Identifier matching against one data set, sequences included (PS3.4 C.2.2.2.6)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from vannah_pipelines.dicom.identifier import compile_identifier
from vannah_pipelines.dicom.matching import InvalidMatchError


def _ds(**elements: object) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _stored() -> Dataset:
    """A request with two procedures, the second with a nested code of two items."""
    return _ds(
        PatientName="Doe^Jane",
        RequestAttributesSequence=Sequence(
            [
                _ds(RequestedProcedureID="RP1", ScheduledProcedureStepStartDate="20240110"),
                _ds(
                    RequestedProcedureID="RP2",
                    ScheduledProcedureStepStartDate="20240220",
                    ScheduledProtocolCodeSequence=Sequence(
                        [_ds(CodeValue="P-1", CodeMeaning="Head"), _ds(CodeValue="P-2")]
                    ),
                ),
            ]
        ),
    )


def _query(**item: object) -> Dataset:
    return _ds(PatientName="", RequestAttributesSequence=Sequence([_ds(**item)]))


def test_item_matches_when_one_stored_item_matches_every_key() -> None:
    query = compile_identifier(
        _query(RequestedProcedureID="RP*", ScheduledProcedureStepStartDate="20240201-")
    )
    answer = query.apply(_stored())
    assert answer is not None
    assert answer.PatientName == "Doe^Jane"
    assert [
        (i.RequestedProcedureID, i.ScheduledProcedureStepStartDate)
        for i in answer.RequestAttributesSequence
    ] == [("RP2", "20240220")]
    # The keys must hold in the same item: RP1 with a February date matches nothing.
    query = compile_identifier(
        _query(RequestedProcedureID="RP1", ScheduledProcedureStepStartDate="20240201-")
    )
    assert query.apply(_stored()) is None


def test_nested_sequences_match_the_same_way() -> None:
    nested = Sequence([_ds(CodeValue="P-2", CodeMeaning="")])
    query = compile_identifier(
        _query(RequestedProcedureID="", ScheduledProtocolCodeSequence=nested)
    )
    answer = query.apply(_stored())
    assert answer is not None
    (item,) = answer.RequestAttributesSequence
    assert item.RequestedProcedureID == "RP2"
    assert [(c.CodeValue, c.CodeMeaning) for c in item.ScheduledProtocolCodeSequence] == [
        ("P-2", None)
    ]
    nested = Sequence([_ds(CodeValue="P-3")])
    query = compile_identifier(_query(ScheduledProtocolCodeSequence=nested))
    assert query.apply(_stored()) is None


def test_universal_item_keys_return_every_item_with_those_keys() -> None:
    answer = compile_identifier(_query(RequestedProcedureID="")).apply(_stored())
    assert answer is not None
    assert [i.RequestedProcedureID for i in answer.RequestAttributesSequence] == ["RP1", "RP2"]
    assert all(len(i) == 1 for i in answer.RequestAttributesSequence)


def test_empty_sequence_key_returns_the_whole_sequence_and_missing_one_matches() -> None:
    query = compile_identifier(_ds(RequestAttributesSequence=Sequence([])))
    answer = query.apply(_stored())
    assert answer is not None
    assert answer.RequestAttributesSequence == _stored().RequestAttributesSequence
    empty = query.apply(Dataset())
    assert empty is not None and len(empty.RequestAttributesSequence) == 0
    # An item key with a value does not match a data set without the sequence.
    assert compile_identifier(_query(RequestedProcedureID="RP1")).apply(Dataset()) is None


def test_malformed_identifiers_are_refused_with_the_key_named() -> None:
    two_items = _ds(RequestAttributesSequence=Sequence([_ds(), _ds()]))
    with pytest.raises(InvalidMatchError, match="RequestAttributesSequence"):
        compile_identifier(two_items)
    with pytest.raises(InvalidMatchError, match="ScheduledProcedureStepStartDate"):
        compile_identifier(_query(ScheduledProcedureStepStartDate="2024-01-01"))


def test_excluded_top_level_keys_are_left_out() -> None:
    query = compile_identifier(_ds(PatientName="Nobody", PatientID=""), exclude=[0x00100010])
    answer = query.apply(_ds(PatientName="Doe^Jane", PatientID="P1"))
    assert answer is not None
    assert "PatientName" not in answer and answer.PatientID == "P1"
