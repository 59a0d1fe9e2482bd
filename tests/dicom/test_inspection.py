"""read_instance_ids refuses what a reader could not parse: fixed-size values of the wrong
length (pydicom raises BytesLengthException on them at ingest), also inside sequences, and
deflate bombs, inflated in bounded steps."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import encode

from receiver.part10 import file_header
from vannah_pipelines.dicom.headers import read_header
from vannah_pipelines.dicom.inspection import InflatedTooLargeError, read_instance_ids
from vannah_pipelines.dicom.synthetic import make_instance
from vannah_pipelines.errors import InvalidDicomError

# (tag, VR, a value of the wrong length): 3-byte US, 2-byte UL, 5-byte FD, 6-byte AT, ...
BAD_VALUES = [
    (0x00280010, "US", b"\x01\x00\x00"),  # Rows
    (0x00280106, "SS", b"\x01"),  # SmallestImagePixelValue ("US or SS")
    (0x00189087, "FD", b"\x00" * 5),  # DiffusionBValue
    (0x00181310, "US", b"\x00" * 7),  # AcquisitionMatrix, 4 values of 2 bytes
    (0x00209165, "AT", b"\x00" * 6),  # DimensionIndexPointer
]
SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]


def _element(tag: int, vr: str, value: bytes, ts: str) -> bytes:
    little = ts != ExplicitVRBigEndian
    order = "<" if little else ">"
    group_element = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    if ts == ImplicitVRLittleEndian:
        return group_element + struct.pack("<L", len(value)) + value
    return group_element + vr.encode() + struct.pack(order + "H", len(value)) + value


def _encode(ds: Dataset, ts: str) -> bytes:
    data = encode(ds, ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian)
    assert data is not None
    return data


def _instance() -> Dataset:
    return make_instance("MR", rows=4, columns=4)


def _splice(data: bytes, element: bytes, ts: str, tag: int) -> bytes:
    """Insert `element` in tag order among the top-level elements of `data`."""
    order = "<" if ts != ExplicitVRBigEndian else ">"
    pos = 0
    while pos < len(data):
        group, elem = struct.unpack_from(order + "HH", data, pos)
        if (group << 16 | elem) > tag:
            break
        if ts == ImplicitVRLittleEndian:
            length, header = struct.unpack_from("<L", data, pos + 4)[0], 8
        elif data[pos + 4 : pos + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"UC"):
            length, header = struct.unpack_from(order + "L", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from(order + "H", data, pos + 6)[0], 8
        pos += header + length
    return data[:pos] + element + data[pos:]


def _without(ds: Dataset, tag: int) -> Dataset:
    if tag in ds:
        del ds[tag]
    return ds


@pytest.mark.parametrize("ts", SYNTAXES)
@pytest.mark.parametrize(("tag", "vr", "value"), BAD_VALUES)
def test_read_instance_ids_refuses_fixed_size_value_of_wrong_length(
    ts: str, tag: int, vr: str, value: bytes
) -> None:
    data = _splice(_encode(_without(_instance(), tag), ts), _element(tag, vr, value, ts), ts, tag)
    with pytest.raises(InvalidDicomError, match=f"{vr}.* of {len(value)} bytes: not a multiple"):
        read_instance_ids(data, ts)


def test_read_instance_ids_wrong_length_is_what_ingest_cannot_read(tmp_path: Path) -> None:
    """The fault: pydicom fails on the landed file (so the receiver must refuse it)."""
    ts = ExplicitVRLittleEndian
    ds = _without(_instance(), 0x00280010)
    data = _splice(_encode(ds, ts), _element(0x00280010, "US", b"\x01\x00\x00", ts), ts, 0x00280010)
    path = tmp_path / "bad.dcm"
    path.write_bytes(file_header(ds.SOPClassUID, ds.SOPInstanceUID, ts) + data)
    with pytest.raises((BytesLengthException, InvalidDicomError)):
        read_header(path)


@pytest.mark.parametrize("ts", SYNTAXES)
def test_read_instance_ids_refuses_wrong_length_inside_a_sequence(ts: str) -> None:
    ds = _instance()
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.add_new(0x00189087, "FD", 2.5)
    ds.ReferencedImageSequence = Sequence([item])
    good = _encode(ds, ts)
    read_instance_ids(good, ts)  # well formed as encoded
    # The item's FD value, 8 bytes: make its length field say 5 (and cut 3 bytes).
    order = "<" if ts != ExplicitVRBigEndian else ">"
    fd = struct.pack(order + "d", 2.5)
    pos = good.index(fd)
    if ts == ImplicitVRLittleEndian:
        header = struct.pack("<L", 8)
        patched_header = struct.pack("<L", 5)
    else:
        header = b"FD" + struct.pack(order + "H", 8)
        patched_header = b"FD" + struct.pack(order + "H", 5)
    assert good[pos - len(header) : pos] == header
    bad = good[: pos - len(header)] + patched_header + fd[:5] + good[pos + 8 :]
    # pydicom writes sequences and items of undefined length: no enclosing length to patch.
    with pytest.raises(InvalidDicomError):
        read_instance_ids(bad, ts)


@pytest.mark.parametrize("ts", SYNTAXES)
def test_read_instance_ids_accepts_well_formed_fixed_size_values(ts: str) -> None:
    ds = _instance()
    ds.add_new(0x00181310, "US", [0, 4, 4, 0])
    ds.add_new(0x00189087, "FD", 1.5)
    ds.add_new(0x00209165, "AT", [0x00200032, 0x00280010])
    item = Dataset()
    item.add_new(0x00189087, "FD", 2.5)
    ds.ReferencedImageSequence = Sequence([item])
    read_instance_ids(_encode(ds, ts), ts)


def _deflated(raw: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(raw) + compressor.flush()


def test_read_instance_ids_stops_inflating_at_the_limit() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _instance()
    data = _encode(ds, ExplicitVRLittleEndian)
    # A deflate bomb: 64 MiB of zeros in an OB after the data set inflate from ~64 KiB.
    bomb = _deflated(
        data + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<L", 64 << 20) + bytes(64 << 20)
    )
    assert len(bomb) < 1 << 20
    with pytest.raises(InflatedTooLargeError):
        read_instance_ids(bomb, DeflatedExplicitVRLittleEndian, max_inflated_bytes=4 << 20)
    ids = read_instance_ids(bomb, DeflatedExplicitVRLittleEndian, max_inflated_bytes=128 << 20)
    assert ids.sop_instance_uid == ds.SOPInstanceUID


def test_read_instance_ids_refuses_truncated_deflate() -> None:
    data = _encode(_instance(), ExplicitVRLittleEndian)
    deflated = _deflated(data)
    with pytest.raises(InvalidDicomError, match="truncated"):
        read_instance_ids(deflated[: len(deflated) // 2], DeflatedExplicitVRLittleEndian)


def test_read_instance_ids_refuses_an_unknown_explicit_vr() -> None:
    ts = ExplicitVRLittleEndian
    data = _encode(_instance(), ts)
    pos = data.index(b"\x28\x00\x10\x00US")
    bad = data[: pos + 4] + b"XO" + data[pos + 6 :]
    with pytest.raises(InvalidDicomError, match=r"\(0028,0010\) has an unknown VR XO"):
        read_instance_ids(bad, ts)


@pytest.mark.parametrize("ts", SYNTAXES)
def test_read_instance_ids_refuses_an_image_ingest_would_call_truncated(ts: str) -> None:
    """Native pixel data shorter than Rows x Columns x samples x bits, or none at all."""
    ds = _instance()  # 4 x 4, 16 bits: 32 bytes of pixel data
    read_instance_ids(_encode(ds, ts), ts)
    short = _instance()
    short.PixelData = bytes(16)
    with pytest.raises(InvalidDicomError, match="pixel data has 16 of 32 bytes"):
        read_instance_ids(_encode(short, ts), ts)
    without = _instance()
    del without.PixelData
    with pytest.raises(InvalidDicomError, match="image attributes but no pixel data"):
        read_instance_ids(_encode(without, ts), ts)
