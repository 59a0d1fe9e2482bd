"""PS3.5 UID validation: the gate before any UID becomes a path."""

import pytest

from vannah_pipelines.dicom.uids import is_uid, require_uid
from vannah_pipelines.errors import UnsafeUidError


@pytest.mark.parametrize(
    "value",
    [
        "../../etc/passwd",
        "1.2/../3",
        "1.2.3\x00",
        "",
        "1..2",
        ".1.2",
        "1.2.",
        "1.2.a",
        "1" * 65,
        " 1.2",
        None,
        12,
    ],
)
def test_require_uid_rejects_non_uids(value: object) -> None:
    with pytest.raises(UnsafeUidError):
        require_uid(value, "SOPInstanceUID")


@pytest.mark.parametrize("value", ["1.2.840.10008.5.1.4.1.1.2", "2.25.1234", "1." + "2" * 62])
def test_require_uid_accepts_uids(value: str) -> None:
    assert require_uid(value) == value and is_uid(value)


def test_require_uid_message_names_the_attribute() -> None:
    with pytest.raises(UnsafeUidError, match="StudyInstanceUID"):
        require_uid("../x", "StudyInstanceUID")
