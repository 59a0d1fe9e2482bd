"""The Part-10 header (preamble, prefix, File Meta Information) of a received data set.

Pure (pynetdicom only for its implementation UID and version constants).
pynetdicom's ``event.encoded_dataset(include_meta=True)`` builds the same bytes through a
pydicom ``FileMetaDataset`` and then concatenates them with the whole data set, a copy of
every instance and the largest CPU cost of the handler after the disk write. This encodes
the header directly (PS3.10 7.1, explicit VR little endian), so the handler writes
``header`` and the received data set back to back, without a copy.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"
_SHORT = struct.Struct("<HH2sH")  # tag, VR, 16-bit length
_LONG = struct.Struct("<HH2s2xL")  # tag, VR, reserved, 32-bit length
_VERSION = _LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01"


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    return _element(element, b"UI", value + b"\x00" if len(value) % 2 else value)


def _sh(element: int, text: str) -> bytes:
    value = text.encode("ascii")
    return _element(element, b"SH", value + b" " if len(value) % 2 else value)


_IMPLEMENTATION = _ui(0x0012, PYNETDICOM_IMPLEMENTATION_UID) + _sh(
    0x0013, PYNETDICOM_IMPLEMENTATION_VERSION
)


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Return preamble, ``DICM`` and the File Meta Information group for one data set.

    The same elements, in the same order and encoding, as pynetdicom's ``Event.file_meta``
    written by pydicom: group length, version, media storage SOP class and instance,
    transfer syntax, implementation class UID and version name. The UIDs must be valid
    (ASCII); the caller has checked them.

    >>> header = file_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    >>> header[128:132], header[132:136], len(header) % 2
    (b'DICM', b'\\x02\\x00\\x00\\x00', 0)
    """
    body = b"".join(
        (
            _VERSION,
            _ui(0x0002, sop_class_uid),
            _ui(0x0003, sop_instance_uid),
            _ui(0x0010, transfer_syntax_uid),
            _IMPLEMENTATION,
        )
    )
    group_length = _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<L", len(body))
    return PREAMBLE + group_length + body
