"""Read the identifying UIDs of an encoded data set without decoding it (pure: pydicom's UID only).

The C-STORE and STOW-RS paths store bytes as received, so this walks the element headers once: it
checks that every element fits in the bytes sent (a truncated or garbage data set is
refused) and picks the few top-level UIDs the landing zone needs. Values, including pixel
data, are skipped, never decoded.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.errors import InvalidDicomError, UnsafeUidError

# PS3.5 7.1.2: explicit VRs whose length field is 32 bits (after 2 reserved bytes).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
# PS3.5 7.5: item, item delimitation and sequence delimitation tags.
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_MAX_DEPTH = 64
MAX_INFLATED_BYTES = 4 << 30  # a deflate bomb is refused, not inflated without bound
_INFLATE_INPUT_STEP = 64 << 10
_INFLATE_OUTPUT_STEP = 1 << 20
# PS3.5 6.2: VRs whose values are a whole number of fixed-size numbers (or tags, for AT).
_FIXED_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "FD": 8, "SV": 8, "UV": 8}
# Undefined-length values whose items are fragments, not data sets (PS3.5 A.4).
_FRAGMENT_VRS = frozenset({"OB", "OW", "OB or OW"})

_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_SAMPLES_PER_PIXEL = 0x00280002
_PHOTOMETRIC_INTERPRETATION = 0x00280004
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, _PIXEL_DATA})  # float, double float, pixel
_IMAGE_TAGS = frozenset(
    {
        _SAMPLES_PER_PIXEL,
        _PHOTOMETRIC_INTERPRETATION,
        _NUMBER_OF_FRAMES,
        _ROWS,
        _COLUMNS,
        _BITS_ALLOCATED,
    }
)
_WANTED = frozenset(
    {_SOP_CLASS_UID, _SOP_INSTANCE_UID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID, *_IMAGE_TAGS}
)
# PS3.5 6.2: every VR; pydicom cannot read an explicit VR data set with another.
_EXPLICIT_VRS = {
    raw: raw.decode("ascii")
    for raw in (
        b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
        b"UL UN UR US UT UV"
    ).split()
}


class InflatedTooLargeError(InvalidDicomError):
    """A deflated data set inflates beyond the size accepted (refused, not inflated)."""


@dataclass(frozen=True)
class InstanceIds:
    """The UIDs that identify a received instance, each checked by ``require_uid``."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class _Encoding:
    implicit: bool
    little: bool

    @functools.cached_property
    def tag(self) -> struct.Struct:
        return struct.Struct("<HH" if self.little else ">HH")

    @functools.cached_property
    def u16(self) -> struct.Struct:
        return struct.Struct("<H" if self.little else ">H")

    @functools.cached_property
    def u32(self) -> struct.Struct:
        return struct.Struct("<L" if self.little else ">L")


_IMPLICIT_LE = _Encoding(implicit=True, little=True)


def read_instance_ids(
    dataset: bytes | memoryview,
    transfer_syntax_uid: str,
    *,
    max_inflated_bytes: int = MAX_INFLATED_BYTES,
) -> InstanceIds:
    """Return the SOP Class/Instance, Study and Series Instance UIDs of an encoded data set.

    Walks every element header, nested sequence items included, and refuses what a
    reader could not parse: an element or item running past the end, a fixed-size value
    (US, SS, UL, SL, FL, FD, AT, SV, UV; for implicit VR, by the data dictionary) whose
    length is not a multiple of its size, a missing delimiter.

    Parameters
    ----------
    dataset
        The data set as received (no preamble, no file meta), in `transfer_syntax_uid`.
    transfer_syntax_uid
        The transfer syntax the data set is encoded in (the presentation context's).
    max_inflated_bytes
        For a deflated transfer syntax: the largest inflated size accepted.

    Returns
    -------
    InstanceIds
        The four UIDs, each valid per PS3.5 9.1 and so safe as a path component.

    Raises
    ------
    UnsafeUidError
        If one of the four UIDs is missing, empty or not a UID (``../``, letters, ...).
    InflatedTooLargeError
        If a deflated data set inflates beyond `max_inflated_bytes` (inflation stops there).
    InvalidDicomError
        If the data set cannot be parsed: truncated, garbage, a fixed-size value of the
        wrong length, unknown transfer syntax.

    Examples
    --------
    >>> from pydicom.uid import ImplicitVRLittleEndian as ts
    >>> read_instance_ids(b"", ts)
    Traceback (most recent call last):
    ...
    vannah_pipelines.errors.UnsafeUidError: SOPClassUID is not a valid DICOM UID: None
    >>> bad_rows = bytes.fromhex("28001000 03000000 010000")  # (0028,0010) Rows, 3 bytes
    >>> read_instance_ids(bad_rows, ts)
    Traceback (most recent call last):
    ...
    vannah_pipelines.errors.InvalidDicomError: (0028,0010) US of 3 bytes: not a multiple of 2
    """
    encoding, deflated, native = _syntax(transfer_syntax_uid)
    buf = memoryview(_inflate(dataset, max_inflated_bytes) if deflated else dataset)
    found: dict[int, bytes] = {}
    pixels: dict[int, int] = {}
    end = _walk_dataset(
        buf, 0, len(buf), encoding, depth=0, found=found, in_item=False, pixels=pixels
    )
    if end != len(buf):  # pragma: no cover - _walk_dataset consumes all or raises
        raise InvalidDicomError("data set has trailing bytes")
    _check_pixel_data(found, pixels, encoding, native=native)
    return InstanceIds(
        sop_class_uid=_uid(found, _SOP_CLASS_UID, "SOPClassUID"),
        sop_instance_uid=_uid(found, _SOP_INSTANCE_UID, "SOPInstanceUID"),
        study_instance_uid=_uid(found, _STUDY_INSTANCE_UID, "StudyInstanceUID"),
        series_instance_uid=_uid(found, _SERIES_INSTANCE_UID, "SeriesInstanceUID"),
    )


@functools.lru_cache(maxsize=64)
def _syntax(transfer_syntax_uid: str) -> tuple[_Encoding, bool, bool]:
    """The encoding of a transfer syntax, whether it is deflated, whether its pixel data
    is native (not compressed)."""
    ts = UID(transfer_syntax_uid)
    try:
        encoding = _Encoding(implicit=ts.is_implicit_VR, little=ts.is_little_endian)
        return encoding, ts.is_deflated, not ts.is_compressed
    except ValueError as exc:
        raise InvalidDicomError(f"unknown transfer syntax {transfer_syntax_uid!r}") from exc


def _inflate(data: bytes | memoryview, limit: int) -> bytearray:
    """Inflate in bounded steps: never more than `limit` bytes (plus one step) in memory."""
    # PS3.5 A.5: deflated explicit VR little endian is raw deflate (no zlib header).
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    view = memoryview(data)
    try:
        for start in range(0, len(view), _INFLATE_INPUT_STEP):
            pending: bytes | memoryview = view[start : start + _INFLATE_INPUT_STEP]
            while pending:
                out += inflater.decompress(pending, _INFLATE_OUTPUT_STEP)
                if len(out) > limit:
                    raise InflatedTooLargeError(f"deflated data set inflates beyond {limit} bytes")
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        while not inflater.eof and len(out) <= limit:
            chunk = inflater.decompress(b"", _INFLATE_OUTPUT_STEP)
            if not chunk:
                break
            out += chunk
        if len(out) > limit:
            raise InflatedTooLargeError(f"deflated data set inflates beyond {limit} bytes")
    except zlib.error as exc:
        raise InvalidDicomError(f"deflated data set cannot be inflated: {exc}") from exc
    if not inflater.eof:
        raise InvalidDicomError("deflated data set is truncated")
    return out


def _uid(found: dict[int, bytes], tag: int, keyword: str) -> str:
    raw = found.get(tag)
    if raw is None:
        return require_uid(None, keyword)
    try:
        # PS3.5 9.1: UI values are padded to even length with a NUL; tolerate a space too.
        value = raw.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        return require_uid(raw, keyword)
    return require_uid(value, keyword)


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    """The data dictionary's VR of a public `tag` ("" if unknown or private)."""
    if tag >> 16 & 1:
        return ""  # private: the VR depends on the creator, pydicom reads it as UN
    if tag & 0xFFFF == 0:
        return "UL"  # PS3.5 7.2: group length
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _vr_name(raw: bytes) -> str:
    return raw.decode("ascii") if raw.isalpha() else f"0x{raw.hex().upper()}"


def _fixed_size(vr: str) -> int:
    """The value size of `vr` if fixed (every VR of "US or SS" style alternatives), else 0."""
    sizes = {_FIXED_SIZES.get(one.strip(), 0) for one in vr.split(" or ")}
    return sizes.pop() if len(sizes) == 1 else 0


class _SizeTable(dict[str, int]):
    """VR -> a length its values' lengths are multiples of (1: any); filled on first use."""

    def __missing__(self, vr: str) -> int:
        size = self[vr] = _fixed_size(vr) or 1
        return size


_VALUE_SIZES = _SizeTable()


def _refuse_length(tag: int, vr: str, length: int) -> None:
    size = _VALUE_SIZES[vr]
    raise InvalidDicomError(
        f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr} of {length} bytes: not a multiple of {size}"
    )


def _walk_dataset(
    buf: memoryview,
    pos: int,
    end: int,
    enc: _Encoding,
    *,
    depth: int,
    found: dict[int, bytes] | None,
    in_item: bool,
    pixels: dict[int, int] | None = None,
    lenient: bool = False,
) -> int:
    """Walk the elements in ``[pos, end)``; return where they stop (after the item
    delimiter if `in_item`; an item of defined length ends at `end` with none).

    `lenient` (inside a sequence or item of defined length): a structure cut short ends
    the walk at `end` instead of refusing, as pydicom reads such values, short; only
    values it cannot convert (fixed-size lengths, unknown VRs) are refused there."""
    tag_s, u16, u32 = enc.tag, enc.u16, enc.u32
    while pos < end:
        if end - pos < 8:
            if lenient:
                return end
            raise InvalidDicomError(f"truncated element header at offset {pos}")
        group, element = tag_s.unpack_from(buf, pos)
        tag = group << 16 | element
        if group == 0xFFFE:
            # Delimiters carry no VR, even in explicit VR transfer syntaxes (PS3.5 7.5).
            if tag == _ITEM_DELIMITER and in_item:
                return pos + 8
            if lenient:
                return end
            raise InvalidDicomError(f"unexpected ({group:04X},{element:04X}) at offset {pos}")
        raw_vr = bytes(buf[pos + 4 : pos + 6])
        # pydicom's rule: bytes outside "AA".."ZZ" mean a switch to implicit VR; inside,
        # a VR it does not know cannot be read.
        if not enc.implicit and b"AA" <= raw_vr <= b"ZZ":
            known = _EXPLICIT_VRS.get(raw_vr)
            if known is None:
                raise InvalidDicomError(
                    f"({group:04X},{element:04X}) has an unknown VR {_vr_name(raw_vr)}"
                )
            vr = known
            if raw_vr in _LONG_VRS:
                if end - pos < 12:
                    if lenient:
                        return end
                    raise InvalidDicomError(f"truncated element header at offset {pos}")
                length = u32.unpack_from(buf, pos + 8)[0]
                header = 12
            else:
                length = u16.unpack_from(buf, pos + 6)[0]
                header = 8
            if vr == "UN" and length != _UNDEFINED:
                vr = _dictionary_vr(tag) or vr  # read as the dictionary's VR (PS3.5 6.2.2)
        else:
            # Implicit VR, or an explicit data set that switched to implicit (seen in the wild).
            vr = _dictionary_vr(tag)
            length = u32.unpack_from(buf, pos + 4)[0]
            header = 8
        pos += header
        if pixels is not None and tag in _PIXEL_TAGS:
            pixels[tag] = length
        if length == _UNDEFINED:
            # SQ, UN or encapsulated pixel data: items up to a sequence delimiter. The
            # content of an undefined-length UN is implicit VR little endian (PS3.5 6.2.2).
            inner = _IMPLICIT_LE if vr == "UN" else enc
            fragments = vr in _FRAGMENT_VRS
            pos = _walk_items(
                buf, pos, end, inner, depth=depth + 1, datasets=not fragments, lenient=lenient
            )
            continue
        if length > end - pos:
            if lenient:
                return end
            raise InvalidDicomError(
                f"element ({group:04X},{element:04X}) of {length} bytes is truncated"
            )
        if vr == "SQ":
            _walk_items(
                buf,
                pos,
                pos + length,
                enc,
                depth=depth + 1,
                datasets=True,
                defined=True,
                lenient=True,
            )
        elif length % _VALUE_SIZES[vr]:
            _refuse_length(tag, vr, length)
        if found is not None and tag in _WANTED:
            found[tag] = bytes(buf[pos : pos + length])
        pos += length
    if in_item and not lenient:
        raise InvalidDicomError("item of undefined length has no delimiter")
    return pos


def _check_pixel_data(
    found: dict[int, bytes], pixels: dict[int, int], enc: _Encoding, *, native: bool
) -> None:
    """What ingest's completeness check refuses (``vannah_pipelines.dicom.headers``): an
    image (Rows, Columns, BitsAllocated) without pixel data, or with native pixel data
    shorter than Rows x Columns x samples x frames x BitsAllocated."""
    rows, columns, bits = found.get(_ROWS), found.get(_COLUMNS), found.get(_BITS_ALLOCATED)
    if rows is None or columns is None or bits is None:
        return
    if not pixels:
        raise InvalidDicomError("image attributes but no pixel data")
    actual = pixels.get(_PIXEL_DATA)
    if actual is None or actual == _UNDEFINED or not native:
        return
    little = enc.little
    samples = _us(found.get(_SAMPLES_PER_PIXEL), little) or 1
    photometric = found.get(_PHOTOMETRIC_INTERPRETATION, b"").strip(b" \x00")
    if photometric == b"YBR_FULL_422":
        samples = 2  # PS3.3 C.7.6.3.1.2: chroma subsampled 2:1 horizontally
    frames = _is(found.get(_NUMBER_OF_FRAMES)) or 1
    area = (_us(rows, little) or 0) * (_us(columns, little) or 0)
    expected = (area * samples * frames * (_us(bits, little) or 0) + 7) // 8
    if actual < expected:
        raise InvalidDicomError(f"pixel data has {actual} of {expected} bytes")


def _us(raw: bytes | None, little: bool) -> int | None:
    """The first value of a US element (None if empty or absent)."""
    if not raw or len(raw) < 2:
        return None
    return int.from_bytes(raw[:2], "little" if little else "big")


def _is(raw: bytes | None) -> int | None:
    """The first value of an IS element (None if empty, absent or not an integer)."""
    if not raw:
        return None
    try:
        return int(raw.split(b"\\")[0].strip(b" \x00"))
    except ValueError:
        return None


def _walk_items(
    buf: memoryview,
    pos: int,
    end: int,
    enc: _Encoding,
    *,
    depth: int,
    datasets: bool,
    defined: bool = False,
    lenient: bool = False,
) -> int:
    """Walk items in ``[pos, end)``: up to and including the sequence delimiter (returns
    the end), or, for a sequence of defined length, all of them. With `datasets`, walk
    each item's elements too (not for encapsulated pixel data fragments), leniently for
    an item of defined length (see :func:`_walk_dataset`)."""
    if depth > _MAX_DEPTH:
        raise InvalidDicomError("sequences are nested too deeply")
    tag_s, u32 = enc.tag, enc.u32
    while end - pos >= 8:
        group, element = tag_s.unpack_from(buf, pos)
        tag = group << 16 | element
        length = u32.unpack_from(buf, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_DELIMITER:
            return pos
        if tag != _ITEM:
            if lenient:
                return end
            raise InvalidDicomError(f"expected an item, found ({group:04X},{element:04X})")
        if length == _UNDEFINED:
            if not datasets:
                raise InvalidDicomError("a pixel data fragment of undefined length")
            pos = _walk_dataset(
                buf, pos, end, enc, depth=depth, found=None, in_item=True, lenient=lenient
            )
        elif length > end - pos:
            if not lenient:
                raise InvalidDicomError(f"item of {length} bytes is truncated")
            if datasets:
                _walk_dataset(
                    buf, pos, end, enc, depth=depth, found=None, in_item=False, lenient=True
                )
            return end
        else:
            if datasets:
                _walk_dataset(
                    buf,
                    pos,
                    pos + length,
                    enc,
                    depth=depth,
                    found=None,
                    in_item=False,
                    lenient=True,
                )
            pos += length
    if defined and pos != end:
        # pydicom cannot read this (it reads item headers up to the sequence's end).
        raise InvalidDicomError("sequence of defined length ends inside an item header")
    if lenient or defined:
        return end
    raise InvalidDicomError("sequence of undefined length has no delimiter")


_FILE_PREFIX_END = 132  # 128-byte preamble + "DICM" (PS3.10 7.1)
_MAX_FILE_META = 64 * 1024
_TRANSFER_SYNTAX_UID = 0x00020010
_MEDIA_STORAGE_SOP_CLASS_UID = 0x00020002
_MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
_META_WANTED = frozenset(
    {_TRANSFER_SYNTAX_UID, _MEDIA_STORAGE_SOP_CLASS_UID, _MEDIA_STORAGE_SOP_INSTANCE_UID}
)
_EXPLICIT_LE = _Encoding(implicit=False, little=True)


@dataclass(frozen=True)
class FileMeta:
    """What a Part-10 file's File Meta Information says, and where its data set starts."""

    transfer_syntax_uid: str
    media_storage_sop_class_uid: str | None  # None when absent or not a valid UID
    media_storage_sop_instance_uid: str | None
    dataset_offset: int


def read_file_meta(data: bytes | memoryview) -> FileMeta:
    """Read the File Meta Information of a Part-10 file without decoding anything else.

    Parameters
    ----------
    data
        The whole file: 128-byte preamble, ``DICM``, group 0002 (explicit VR little
        endian, PS3.10 7.1), then the data set.

    Returns
    -------
    FileMeta
        The transfer syntax (a valid UID), the media storage SOP class and instance UIDs
        (None unless valid UIDs) and the offset of the data set.

    Raises
    ------
    InvalidDicomError
        If there is no preamble and ``DICM`` prefix, the group is truncated or too long,
        or the transfer syntax is missing or not a UID.

    Examples
    --------
    >>> read_file_meta(b"not dicom")
    Traceback (most recent call last):
    ...
    vannah_pipelines.errors.InvalidDicomError: not a DICOM Part-10 file (no DICM prefix)
    """
    buf = memoryview(data)
    if len(buf) < _FILE_PREFIX_END or bytes(buf[128:_FILE_PREFIX_END]) != b"DICM":
        raise InvalidDicomError("not a DICOM Part-10 file (no DICM prefix)")
    enc = _EXPLICIT_LE
    pos, end = _FILE_PREFIX_END, len(buf)
    found: dict[int, bytes] = {}
    while end - pos >= 8:
        group, element = enc.tag.unpack_from(buf, pos)
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if end - pos < 12:
                raise InvalidDicomError("truncated file meta information")
            length, header = enc.u32.unpack_from(buf, pos + 8)[0], 12
        else:
            length, header = enc.u16.unpack_from(buf, pos + 6)[0], 8
        if length == _UNDEFINED or length > end - pos - header:
            raise InvalidDicomError(f"file meta element (0002,{element:04X}) is truncated")
        tag = group << 16 | element
        if tag in _META_WANTED:
            found[tag] = bytes(buf[pos + header : pos + header + length])
        pos += header + length
        if pos - _FILE_PREFIX_END > _MAX_FILE_META:
            raise InvalidDicomError("file meta information is implausibly long")
    try:
        syntax = _uid(found, _TRANSFER_SYNTAX_UID, "TransferSyntaxUID")
    except UnsafeUidError as exc:
        raise InvalidDicomError(f"file meta information: {exc}") from exc
    return FileMeta(
        transfer_syntax_uid=syntax,
        media_storage_sop_class_uid=_optional_uid(found, _MEDIA_STORAGE_SOP_CLASS_UID),
        media_storage_sop_instance_uid=_optional_uid(found, _MEDIA_STORAGE_SOP_INSTANCE_UID),
        dataset_offset=pos,
    )


def _optional_uid(found: dict[int, bytes], tag: int) -> str | None:
    try:
        return _uid(found, tag, "UID")
    except UnsafeUidError:
        return None
