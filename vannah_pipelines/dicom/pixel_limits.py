"""Pixel budget: what a decode would allocate, checked from the headers before any decode.

Pure (pydicom + stdlib). A rendered, thumbnail, frames, bulk data or transcoding request
decodes at most ``Rows x Columns x SamplesPerPixel x ceil(BitsAllocated / 8) x frames``
bytes, and only when the header agrees with the data present: NumberOfFrames must fit the
native pixel data, or the fragments (or offset tables) of encapsulated pixel data, and a
JPEG or JPEG 2000 codestream may not describe a larger image than the DICOM header does
(the decoder allocates what the codestream says).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets, parse_fragments

_NATIVE = frozenset(
    {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
    }
)
_JPEG_2000 = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
_JPEG = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",  # JPEG-LS: SOF55
        "1.2.840.10008.1.2.4.81",
    }
)
# JPEG start-of-frame markers (ITU T.81 B.1.1.3; T.87 SOF55 for JPEG-LS); not DHT/JPG/DAC.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_MAX_MARKERS = 256


class PixelError(ValueError):
    """Pixel data that cannot be served (answered 400, or 404 for a missing frame)."""


class PixelDataMismatchError(PixelError):
    """The pixel description (Rows, Columns, NumberOfFrames, codestream) and the data
    present disagree: decoding would trust numbers the data does not back."""


class DecodeBudgetError(PixelError):
    """The decode asked for needs more than ``dicomweb_max_decoded_bytes``."""


@dataclass(frozen=True)
class PixelHeader:
    """The image pixel description that sizes a decode (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int  # as declared (NumberOfFrames, 1 when absent)

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded frame: Rows x Columns x SamplesPerPixel x bytes a sample."""
        return self.rows * self.columns * self.samples * math.ceil(self.bits_allocated / 8)

    @property
    def frame_bits(self) -> int:
        """Bits of one native frame (1-bit data is packed)."""
        return self.rows * self.columns * self.samples * self.bits_allocated


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise PixelDataMismatchError(f"{keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise PixelDataMismatchError(f"{keyword} is not a number") from exc


def pixel_header(ds: Dataset) -> PixelHeader:
    """The pixel description of `ds`, each value in its allowed range.

    Raises
    ------
    PixelDataMismatchError
        If an attribute is missing or out of range.
    """
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    samples = _int(ds, "SamplesPerPixel", 1)
    bits = _int(ds, "BitsAllocated")
    frames_value = str(ds.get("NumberOfFrames") or "1").strip()
    if not frames_value.isascii() or not frames_value.isdigit() or len(frames_value) > 10:
        raise PixelDataMismatchError(f"NumberOfFrames {frames_value[:20]!r} is not a count")
    frames = max(1, int(frames_value))
    if not (1 <= rows <= 0xFFFF and 1 <= columns <= 0xFFFF):
        raise PixelDataMismatchError(f"Rows {rows} / Columns {columns} out of range")
    if samples not in (1, 3, 4):
        raise PixelDataMismatchError(f"SamplesPerPixel {samples} is not 1, 3 or 4")
    if (bits != 1 and bits % 8) or not 1 <= bits <= 64:
        raise PixelDataMismatchError(f"BitsAllocated {bits} is not 1 or a multiple of 8")
    return PixelHeader(rows, columns, samples, bits, frames)


def transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def is_encapsulated(ds: Dataset) -> bool:
    syntax = transfer_syntax(ds)
    return bool(syntax) and syntax not in _NATIVE


def frames_present(ds: Dataset) -> int:
    """NumberOfFrames, once checked against the pixel data present (0: no pixel data).

    Native data must hold every frame; encapsulated data needs a fragment per frame (and,
    with an offset table, an offset per frame).

    Raises
    ------
    PixelDataMismatchError
        If the header promises frames the data does not hold.

    >>> from pydicom.dataset import Dataset, FileMetaDataset
    >>> ds = Dataset(); ds.file_meta = FileMetaDataset()
    >>> ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    >>> ds.Rows = ds.Columns = 2; ds.BitsAllocated = 8; ds.NumberOfFrames = 3
    >>> ds.PixelData = bytes(12)
    >>> frames_present(ds)
    3
    >>> ds.NumberOfFrames = 2147483647
    >>> frames_present(ds)
    Traceback (most recent call last):
    ...
    vannah_pipelines.dicom.pixel_limits.PixelDataMismatchError: NumberOfFrames 2147483647 needs ...
    """
    if "PixelData" not in ds:
        return 0
    header = pixel_header(ds)
    data = ds.PixelData
    if not is_encapsulated(ds):
        frame_bits = header.frame_bits
        if str(ds.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422":
            frame_bits = frame_bits * 2 // 3  # PS3.3 C.7.6.3.1.2: two values per pixel
        needed = math.ceil(frame_bits * header.frames / 8)
        if needed > len(data):
            raise PixelDataMismatchError(
                f"NumberOfFrames {header.frames} needs {needed} bytes of pixel data; "
                f"{len(data)} present"
            )
        return header.frames
    extended = ds.get("ExtendedOffsetTable")
    try:
        buffer = BytesIO(data)
        offsets = parse_basic_offsets(buffer)
        fragments, _ = parse_fragments(buffer)
    except (ValueError, struct.error) as exc:
        raise PixelDataMismatchError(f"encapsulated pixel data unreadable: {exc}") from exc
    if extended:
        ceiling = len(extended) // 8
    elif offsets:
        ceiling = len(offsets)
    else:
        ceiling = fragments
    if header.frames > min(ceiling, fragments):
        raise PixelDataMismatchError(
            f"NumberOfFrames {header.frames} but the encapsulated pixel data holds "
            f"{fragments} fragment(s)"
            + (f" and an offset table of {ceiling}" if ceiling != fragments else "")
        )
    return header.frames


def require_budget(header: PixelHeader, frames: int, max_bytes: int) -> None:
    """Refuse a decode of `frames` frames over `max_bytes` (``dicomweb_max_decoded_bytes``).

    >>> require_budget(PixelHeader(512, 512, 1, 16, 1), 2, 2**20)
    >>> require_budget(PixelHeader(512, 512, 1, 16, 1), 3, 2**20)
    Traceback (most recent call last):
    ...
    vannah_pipelines.dicom.pixel_limits.DecodeBudgetError: decoding 3 frame(s) of 512x512x1 ...

    Raises
    ------
    DecodeBudgetError
        If the decoded size is over the budget.
    """
    size = header.frame_bytes * frames
    if size > max_bytes:
        raise DecodeBudgetError(
            f"decoding {frames} frame(s) of {header.columns}x{header.rows}x{header.samples} "
            f"at {header.bits_allocated} bits allocated needs {size} bytes; this service "
            f"decodes at most {max_bytes} bytes per request (ask for fewer frames, or for the "
            "frames as stored with transfer-syntax=*)"
        )


def check_codestream(frame: bytes, syntax: str, header: PixelHeader) -> None:
    """Refuse a JPEG / JPEG-LS / JPEG 2000 frame whose codestream describes more pixels
    than the DICOM header (the decoder sizes its buffers from the codestream).

    Raises
    ------
    PixelDataMismatchError
        If the codestream's image is larger than one frame of `header`, or its header
        cannot be found.
    """
    if syntax in _JPEG_2000:
        width, height, components, precision = _j2k_size(frame)
    elif syntax in _JPEG:
        width, height, components, precision = _jpeg_size(frame)
    else:
        return
    if width > header.columns or height > header.rows or components > header.samples:
        raise PixelDataMismatchError(
            f"the codestream is {width}x{height}x{components}; the header says "
            f"{header.columns}x{header.rows}x{header.samples}"
        )
    if precision > max(header.bits_allocated, 8):
        raise PixelDataMismatchError(
            f"the codestream has {precision}-bit samples; BitsAllocated is {header.bits_allocated}"
        )


def check_codestreams(frames: Iterable[bytes], syntax: str, header: PixelHeader) -> None:
    for frame in frames:
        check_codestream(frame, syntax, header)


def _j2k_size(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, components, max precision) from a J2K codestream's SIZ marker
    (ITU T.800 A.5.1), inside a JP2 file's jp2c box if wrapped."""
    start = 0
    if data[4:8] == b"jP  ":  # JP2 file format: find the contiguous codestream box
        start = _jp2c_offset(data)
    if data[start : start + 4] != b"\xff\x4f\xff\x51" or len(data) < start + 42:
        raise PixelDataMismatchError("no JPEG 2000 SIZ marker at the codestream start")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">4I", data, start + 8)
    (csiz,) = struct.unpack_from(">H", data, start + 40)
    if len(data) < start + 42 + 3 * csiz:
        raise PixelDataMismatchError("JPEG 2000 SIZ marker cut short")
    precision = max(
        ((data[start + 42 + 3 * i] & 0x7F) + 1 for i in range(csiz)),
        default=0,
    )
    return max(0, xsiz - xosiz), max(0, ysiz - yosiz), csiz, precision


def _jp2c_offset(data: bytes) -> int:
    pos = 0
    for _ in range(_MAX_MARKERS):
        if pos + 8 > len(data):
            break
        length, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:
            if pos + 16 > len(data):
                break
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        if kind == b"jp2c":
            return pos + header
        if length < header:
            break
        pos += length
    raise PixelDataMismatchError("no JPEG 2000 codestream box in the JP2 file")


def _jpeg_size(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, components, precision) from a JPEG / JPEG-LS frame header
    (ITU T.81 B.2.2, T.87 SOF55), found by walking the marker segments."""
    if data[:2] != b"\xff\xd8":
        raise PixelDataMismatchError("no JPEG SOI marker at the frame start")
    pos = 2
    for _ in range(_MAX_MARKERS):
        while (
            pos < len(data)
            and data[pos] == 0xFF
            and pos + 1 < len(data)
            and (data[pos + 1] == 0xFF)
        ):
            pos += 1  # fill bytes
        if pos + 4 > len(data) or data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF:
            if length < 8 or pos + 10 > len(data):
                break
            precision = data[pos + 4]
            height, width = struct.unpack_from(">HH", data, pos + 5)
            components = data[pos + 9]
            return width, height, components, precision
        if marker == 0xDA or length < 2:  # scan before a frame header: malformed
            break
        pos += 2 + length
    raise PixelDataMismatchError("no JPEG frame header (SOF) before the scan")
