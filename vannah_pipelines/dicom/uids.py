"""PS3.5 9.1 UID syntax; a UID that passes is also safe as a file-system path component."""

from __future__ import annotations

import re

from vannah_pipelines.errors import UnsafeUidError

# PS3.5 9.1: components of digits separated by '.', at most 64 characters. Only [0-9.] can
# pass, so no '/', '..' or NUL. Leading zeros in a component break 9.1 but are common in
# the wild (and harmless in a path), so they are accepted, as Orthanc and dcm4chee do.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_uid(value: object) -> bool:
    """Return whether `value` is a syntactically valid DICOM UID.

    >>> is_uid("1.2.840.10008.1.1"), is_uid("../etc"), is_uid("1..2"), is_uid("")
    (True, False, False, False)
    """
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


def require_uid(value: object, attribute: str = "UID") -> str:
    """Return `value` if it is a valid DICOM UID (PS3.5 9.1).

    Parameters
    ----------
    value
        The candidate, usually straight from a data set or a request.
    attribute
        Its DICOM keyword, for the error message.

    Raises
    ------
    UnsafeUidError
        If `value` is not a string of at most 64 characters of dot-separated numbers.
    """
    if not is_uid(value):
        raise UnsafeUidError(value, attribute)
    assert isinstance(value, str)
    return value
