"""Transfer syntaxes an instance can be sent in, and transcoding a Part-10 instance to one
of them: decompressing (pydicom's decoders: pylibjpeg, ...) and lossless compression.

Pure (pydicom + numpy): shared by DICOMweb (WADO-RS / WADO-URI ``transfer-syntax``) and the
outbound C-STORE sender (``vannah_pipelines.dimse``), which decompresses for a peer that
accepts only uncompressed syntaxes. Pixel data is decoded only within a budget checked
from the header first (:mod:`vannah_pipelines.dicom.pixel_limits`).
"""

from __future__ import annotations

from io import BytesIO
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import UID

from vannah_pipelines.dicom.pixel_limits import (
    check_codestreams,
    frames_present,
    pixel_header,
    require_budget,
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
NATIVE = frozenset({EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED_LE})
# Syntaxes we write an instance in after decoding it (encapsulated ones need an encoder).
WRITABLE_NATIVE = frozenset({EXPLICIT_LE, IMPLICIT_LE})

# Encapsulated syntaxes we may encode to (given an encoder): lossless ones only.
LOSSLESS_ENCODINGS = frozenset(
    {
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.201",
    }
)


def can_decode(stored: str) -> bool:
    """Whether pixel data stored in `stored` can be decoded here."""
    if stored in NATIVE or not stored:
        return True
    try:
        return bool(get_decoder(UID(stored)).is_available)
    except (NotImplementedError, ValueError):
        return False


def can_encode(target: str) -> bool:
    try:
        return bool(get_encoder(UID(target)).is_available)
    except (NotImplementedError, ValueError):
        return False


def transcode_reason(stored: str, target: str) -> str | None:
    """None if an instance stored in `stored` can be sent in `target`; else why not."""
    if target == stored:
        return None
    if not can_decode(stored):
        return f"no decoder here for the stored transfer syntax {stored}"
    if target in WRITABLE_NATIVE:
        return None
    if target not in LOSSLESS_ENCODINGS or not can_encode(target):
        return f"cannot encode to transfer syntax {target} (lossless encodings only)"
    return None


def _swap_to_little_endian(ds: pydicom.Dataset) -> None:
    """Re-encode a big endian data set's pixel data as little endian."""
    for _ in ds.iterall():  # parse every raw element so pydicom re-encodes its value
        pass
    if "PixelData" in ds:
        bits = int(ds.get("BitsAllocated", 8))
        if bits in (16, 32, 64):
            data = np.frombuffer(ds.PixelData, dtype=f">u{bits // 8}")
            ds.PixelData = data.astype(f"<u{bits // 8}").tobytes()
    ds.set_original_encoding(False, True)


def check_decompress(ds: pydicom.Dataset, max_decoded_bytes: int) -> None:
    """Refuse decompressing every frame of `ds` when its header, frame count or
    codestreams say it would decode over `max_decoded_bytes` or more than the data holds.

    Raises
    ------
    PixelError
        DecodeBudgetError or PixelDataMismatchError, before anything is decoded.
    """
    if "PixelData" not in ds:
        return
    stored = str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_LE))
    frames = frames_present(ds)
    header = pixel_header(ds)
    require_budget(header, frames, max_decoded_bytes)
    if stored not in NATIVE:
        check_codestreams(generate_frames(ds.PixelData, number_of_frames=frames), stored, header)


def transcode(source: BinaryIO, target: str, max_decoded_bytes: int) -> bytes:
    """Read a Part-10 instance from `source` and write it in transfer syntax `target`.

    Compressed pixel data is decoded only once its header, frame count and codestreams
    fit `max_decoded_bytes` (:mod:`vannah_pipelines.dicom.pixel_limits`).

    Raises
    ------
    ValueError
        If it cannot be done (see :func:`transcode_reason` to ask first); a
        :class:`~vannah_pipelines.dicom.pixel_limits.PixelError` if the pixel data is over
        the budget or promises more than it holds.
    """
    ds = pydicom.dcmread(source, force=True)
    stored = str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_LE))
    try:
        if stored not in NATIVE and "PixelData" in ds:
            check_decompress(ds, max_decoded_bytes)
            ds.decompress(generate_instance_uid=False)
        if stored == EXPLICIT_BE:
            _swap_to_little_endian(ds)
        if target in NATIVE:
            ds.file_meta.TransferSyntaxUID = UID(target)
        elif "PixelData" in ds:
            ds.compress(target, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = UID(target)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    except (NotImplementedError, RuntimeError, TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"cannot transcode {stored} to {target}: {exc}") from exc
    return buffer.getvalue()
