"""DICOM JSON (PS3.18 F.2) straight to little endian data set bytes, for C-FIND answers.

A C-FIND answer is a handful of short text elements. Building a pydicom Dataset from its
JSON and encoding that costs about 0.5 ms an answer; this writes the bytes directly for the
plain case (ASCII text, person names, IS, US/UL) and says :class:`NotEncodableError` for
anything else (sequences, binary values, decimal strings, non-ASCII text), which the caller
hands to pydicom. A test compares the bytes with pydicom's over varied answers.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

# Text VRs written as the values joined by a backslash, padded to even length.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_LONG_LENGTH_VRS = frozenset({"UC", "UR", "UT"})  # explicit VR: 2 reserved bytes, 4-byte length
_NUMBERS = {"US": struct.Struct("<H"), "UL": struct.Struct("<L")}
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2s2xL")
_IMPLICIT = struct.Struct("<HHL")


class NotEncodableError(ValueError):
    """An element this encoder leaves to pydicom."""


def _person_name(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, Mapping):
        raise NotEncodableError("person name not an object")
    groups = [str(value.get(g, "")) for g in _PN_GROUPS]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _value_bytes(vr: str, values: list[Any]) -> bytes:
    if vr in _NUMBERS:
        packer = _NUMBERS[vr]
        return b"".join(packer.pack(int(v)) for v in values)
    if vr == "PN":
        text = "\\".join(_person_name(v) for v in values)
    elif vr == "IS":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise NotEncodableError("IS value not an integer")
        text = "\\".join(str(v) for v in values)
    elif vr in _TEXT_VRS:
        if not all(isinstance(v, str) or v is None for v in values):
            raise NotEncodableError(f"{vr} value not text")
        text = "\\".join(v or "" for v in values)
    else:
        raise NotEncodableError(f"VR {vr}")
    if not text.isascii():
        raise NotEncodableError("non-ASCII text (needs the character set)")
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


def encode_json_dataset(attributes: Mapping[str, Mapping[str, Any]], *, implicit: bool) -> bytes:
    """The little endian encoding (implicit or explicit VR) of a DICOM JSON data set, as
    pydicom writes it: elements in tag order, text padded with a space (UIDs with NUL),
    group lengths left out.

    >>> encode_json_dataset({"00080052": {"vr": "CS", "Value": ["STUDY"]}}, implicit=True)
    b'\\x08\\x00R\\x00\\x06\\x00\\x00\\x00STUDY '

    Raises
    ------
    NotEncodableError
        For an element outside the plain case (sequence, binary, DS, non-ASCII text...).
    """
    out = bytearray()
    for key in sorted(attributes):
        tag = int(key, 16)
        if tag & 0xFFFF == 0:
            continue  # group lengths are left out, as pydicom does
        element = attributes[key]
        vr = str(element.get("vr", ""))
        if "Value" in element:
            data = _value_bytes(vr, list(element["Value"]))
        elif set(element) <= {"vr"} and (vr in _TEXT_VRS or vr in _NUMBERS or vr in ("PN", "IS")):
            data = b""
        else:
            raise NotEncodableError(f"element {key}")
        group, number = tag >> 16, tag & 0xFFFF
        if implicit:
            out += _IMPLICIT.pack(group, number, len(data))
        elif vr in _LONG_LENGTH_VRS:
            out += _EXPLICIT_LONG.pack(group, number, vr.encode("ascii"), len(data))
        else:
            if len(data) > 0xFFFF:
                raise NotEncodableError(f"element {key} too long")
            out += _EXPLICIT_SHORT.pack(group, number, vr.encode("ascii"), len(data))
        out += data
    return bytes(out)
