"""DIMSE failure responses and Error Comments, shared by every handler (no patient data)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

# A value quoted in a message (``'...'``, ``"..."``, ``b'...'``) and everything after it:
# messages of the pure layer quote the offending value with ``!r``.
_QUOTED_VALUE = re.compile(r"""\s*:?\s*b?['"].*\Z""", re.DOTALL)
MAX_ERROR_COMMENT = 64  # PS3.7 C.4: Error Comment is LO, at most 64 characters


def without_values(message: str) -> str:
    """`message` with any quoted value cut off: query values (names, IDs, dates) never go
    into logs or Error Comments, only attribute keywords and identifiers.

    >>> without_values("PatientBirthDate: not a valid DA (YYYYMMDD) value: '1990-13-45'")
    'PatientBirthDate: not a valid DA (YYYYMMDD) value'
    >>> without_values("QueryRetrieveLevel missing")
    'QueryRetrieveLevel missing'
    """
    return _QUOTED_VALUE.sub("", message)


def error_comment(comment: str) -> str:
    """PS3.7 C.4: Error Comment is LO, at most 64 characters, no backslash (never patient
    data: a quoted value is cut off)."""
    return without_values(comment).replace("\\", "/")[:MAX_ERROR_COMMENT]


def failure(status: int, comment: str) -> Dataset:
    """A response status data set: `status` with an Error Comment."""
    rsp = Dataset()
    rsp.Status = int(status)
    rsp.ErrorComment = error_comment(comment)
    return rsp


@dataclass(frozen=True)
class EncodedIdentifier:
    """A C-FIND answer a handler has already encoded, in the transfer syntax `syntax`
    (``receiver.retrieve.answer_find`` sends `data` as it is, or decodes it for another)."""

    data: bytes
    syntax: str
