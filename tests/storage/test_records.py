"""The per-study record files behind restore requests, holds and moves under way."""

from __future__ import annotations

from pathlib import Path

import pytest

from vannah_pipelines.errors import UnsafeUidError
from vannah_pipelines.storage.records import StudyRecords


def test_records_are_written_whole_kept_or_replaced_and_bad_files_skipped(tmp_path: Path) -> None:
    records = StudyRecords(tmp_path / "r")
    assert list(records.items()) == [] and records.read("1.2.3") is None
    assert records.write("1.2.3", {"n": 1}, replace=False) is True
    assert records.write("1.2.3", {"n": 2}, replace=False) is False  # kept
    assert records.read("1.2.3") == {"n": 1, "study_uid": "1.2.3"}
    assert records.write("1.2.3", {"n": 3}) is True  # replaced
    (tmp_path / "r" / "1.2.4.json").write_text("{not json")
    (tmp_path / "r" / "1.2.5.json").write_text('{"study_uid": "../../etc"}')
    assert [(uid, r["n"]) for uid, r, _ in records.items()] == [("1.2.3", 3)]
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".tmp-")]
    records.remove("1.2.3")
    records.remove("1.2.3")  # removing what is gone is not an error
    assert records.read("1.2.3") is None


@pytest.mark.parametrize("uid", ["../x", "1.2/3", "", "a.b"])
def test_a_study_uid_that_is_not_a_uid_is_never_a_file_name(tmp_path: Path, uid: str) -> None:
    records = StudyRecords(tmp_path / "r")
    with pytest.raises(UnsafeUidError):
        records.write(uid, {})
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())
