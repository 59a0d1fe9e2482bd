"""Pixel work for WADO: frames as stored or decoded, and rendered images (PS3.18 8.3.5).

Pure (pydicom + numpy + Pillow): data sets in, bytes out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, get_frame
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.pixels.utils import pack_bits, pixel_array

from vannah_pipelines.dicom.pixel_limits import (
    DecodeBudgetError,
    PixelError,
    check_codestream,
    check_codestreams,
    frames_present,
    pixel_header,
    require_budget,
)
from vannah_pipelines.dicom.transcoding import EXPLICIT_BE, NATIVE

DEFAULT_THUMBNAIL = 128
_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_FRAME_NUMBER = re.compile(r"0*[1-9][0-9]{0,9}")


class FrameError(PixelError):
    """A frame asked for does not exist or cannot be produced."""


# ---------------------------------------------------------------- frames


def parse_frame_list(text: str, max_frames: int = 1000) -> list[int]:
    """PS3.18 frame list: comma-separated 1-based frame numbers.

    >>> parse_frame_list("1,3, 2")
    [1, 3, 2]

    Repeated numbers are answered once, in the order first asked; more than `max_frames`
    distinct numbers are refused.

    >>> parse_frame_list("1,3,1")
    [1, 3]

    Raises
    ------
    FrameError
        For a piece that is not a frame number, or too many frames.
    """
    pieces = text.split(",")
    if len(pieces) > 4 * max_frames:  # refuse before parsing a huge list
        raise FrameError(f"at most {max_frames} frames per request")
    numbers: dict[int, None] = {}
    for piece in pieces:
        piece = piece.strip()
        if not _FRAME_NUMBER.fullmatch(piece):
            raise FrameError(f"not a frame number: {piece[:20]!r}")
        numbers[int(piece)] = None
        if len(numbers) > max_frames:
            raise FrameError(f"at most {max_frames} frames per request")
    return list(numbers)


def frame_count(ds: Dataset) -> int:
    """Frames of `ds` (0: no pixel data), checked against the pixel data present.

    Raises
    ------
    PixelDataMismatchError
        If NumberOfFrames promises more frames than the data holds.
    """
    return frames_present(ds)


def declared_frames(ds: Dataset) -> int:
    """NumberOfFrames as declared (use once :func:`frame_count` has checked it)."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _native_frame_size(ds: Dataset) -> int:
    """Bits per frame of native pixel data."""
    return (
        int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated)
    )


def _stored_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def check_frames(ds: Dataset, numbers: Sequence[int]) -> int:
    """Check that the frames `numbers` exist; return the instance's frame count.

    Raises
    ------
    FrameError
        If the instance has no pixel data or one of the frames does not exist.
    PixelDataMismatchError
        If NumberOfFrames promises more frames than the data holds.
    """
    count = frame_count(ds)
    if count == 0:
        raise FrameError("the instance has no pixel data")
    highest = numbers[-1] if isinstance(numbers, range) else max(numbers)
    if highest > count:
        raise FrameError(f"frame {highest} does not exist: the instance has {count} frame(s)")
    return count


def needs_decode(ds: Dataset) -> bool:
    """Whether :func:`decoded_frame` decodes (rather than slices stored native bytes)."""
    stored = _stored_syntax(ds)
    return not (stored in NATIVE and stored != EXPLICIT_BE and _native_frame_size(ds) % 8 == 0)


def check_decode(ds: Dataset, frames: int, max_decoded_bytes: int) -> None:
    """Refuse a decode of `frames` frames of `ds` over the budget, from the header alone.

    Raises
    ------
    DecodeBudgetError
        If it would decode more than `max_decoded_bytes`.
    """
    require_budget(pixel_header(ds), frames, max_decoded_bytes)


def check_frame_codestreams(ds: Dataset, numbers: Sequence[int]) -> None:
    """Check the codestreams of the frames `numbers` against the header before any of them
    is decoded (so a lying frame is refused before the answer starts, not in the middle).

    Raises
    ------
    PixelDataMismatchError
        If a frame's codestream describes a larger image than the header.
    """
    stored = _stored_syntax(ds)
    if not stored or stored in NATIVE:
        return
    header = pixel_header(ds)
    count = declared_frames(ds)
    if isinstance(numbers, range) and len(numbers) == count:  # every frame: one pass
        frames = generate_frames(ds.PixelData, number_of_frames=count)
        check_codestreams(frames, stored, header)
        return
    for number in numbers:
        check_codestream(stored_frame(ds, number), stored, header)


def stored_frame(ds: Dataset, number: int) -> bytes:
    """Frame `number` (1-based) as stored: native bytes, or the encapsulated fragment(s)."""
    stored = _stored_syntax(ds)
    data: bytes = ds.PixelData
    if stored and stored not in NATIVE:
        return bytes(get_frame(data, number - 1, number_of_frames=declared_frames(ds)))
    bits = _native_frame_size(ds)
    if bits % 8 == 0:
        size = bits // 8
        return data[(number - 1) * size : number * size]
    return decoded_frame(ds, number)


def decoded_frame(ds: Dataset, number: int) -> bytes:
    """Frame `number` (1-based) decoded to native little endian bytes (colour as RGB,
    interleaved). Check the budget first (:func:`check_decode`); the frame's codestream is
    checked against the header here, before the decoder sees it."""
    if not needs_decode(ds):
        return stored_frame(ds, number)
    arr = _frame_array(ds, number)
    if int(ds.BitsAllocated) == 1:
        return bytes(pack_bits(arr))
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _frame_array(ds: Dataset, number: int) -> np.ndarray[Any, Any]:
    """One frame decoded (only that frame, for multi-frame data), once its codestream
    is known to describe no more than the header."""
    stored = _stored_syntax(ds)
    if stored and stored not in NATIVE:
        check_codestream(stored_frame(ds, number), stored, pixel_header(ds))
    index = number - 1 if declared_frames(ds) > 1 else None
    arr: np.ndarray[Any, Any] = pixel_array(ds, index=index)
    return arr


# ---------------------------------------------------------------- rendered


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: tuple[int, int] | None = None  # (width, height) to fit in
    quality: int = 90
    enlarge: bool = True  # scale up to the viewport (thumbnails only shrink)


def parse_window(text: str | None) -> Window | None:
    """``center,width[,function]`` (PS3.18 8.3.5.1.4)."""
    if text is None or not text.strip():
        return None
    pieces = [p.strip() for p in text.split(",")]
    if len(pieces) not in (2, 3):
        raise ValueError("window is center,width[,function]")
    center, width = float(pieces[0]), float(pieces[1])
    if not math.isfinite(center) or not math.isfinite(width) or width <= 0:
        raise ValueError("window width must be > 0")
    function = pieces[2].upper() if len(pieces) == 3 else "LINEAR"
    if function not in _FUNCTIONS:
        raise ValueError(f"window function is one of {', '.join(_FUNCTIONS)}")
    return Window(center, width, function)


def parse_viewport(text: str | None) -> tuple[int, int] | None:
    """``width,height`` (PS3.18 8.3.5.1.3; source-region forms not supported)."""
    if text is None or not text.strip():
        return None
    pieces = [p.strip() for p in text.split(",")]
    if len(pieces) != 2 or not all(p.isdigit() for p in pieces):
        raise ValueError("viewport is width,height")
    width, height = int(pieces[0]), int(pieces[1])
    if not (0 < width <= 8192 and 0 < height <= 8192):
        raise ValueError("viewport sizes are 1..8192")
    return width, height


def parse_quality(text: str | None) -> int:
    if text is None or not text.strip():
        return 90
    if not text.strip().isdigit() or not 1 <= int(text) <= 100:
        raise ValueError("quality is 1..100")
    return int(text)


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def header_window(ds: Dataset) -> Window | None:
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    return Window(center, width, function if function in _FUNCTIONS else "LINEAR")


def apply_window(values: np.ndarray[Any, Any], window: Window) -> np.ndarray[Any, Any]:
    """PS3.3 C.11.2.1.2/3: values -> 0..255 (float)."""
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if window.function == "LINEAR_EXACT":
        out = (values - (c - w / 2)) / w
    else:
        w = max(w, 1.0)
        out = ((values - (c - 0.5)) / (w - 1) + 0.5) if w > 1 else (values >= c).astype(float)
    return np.clip(out, 0.0, 1.0) * 255.0


def to_display(
    ds: Dataset, arr: np.ndarray[Any, Any], window: Window | None
) -> np.ndarray[Any, Any]:
    """A frame's stored values -> 8-bit grey (H, W) or RGB (H, W, 3) display values."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
        return (arr >> (bits - 8)).astype(np.uint8) if bits > 8 else arr.astype(np.uint8)
    if arr.ndim == 3:  # RGB (YBR is converted to RGB when decoded)
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
        if bits > 8:
            arr = arr.astype(np.float64) * (255.0 / float((1 << bits) - 1))
        rgb: np.ndarray[Any, Any] = np.clip(arr, 0, 255).astype(np.uint8)
        return rgb
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    window = window or header_window(ds)
    if window is None:
        low, high = float(values.min()), float(values.max())
        window = Window((low + high) / 2, max(high - low, 1.0), "LINEAR_EXACT")
    out = apply_window(values, window)
    if photometric == "MONOCHROME1":
        out = 255.0 - out
    grey: np.ndarray[Any, Any] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return grey


def _fit(image: Image.Image, viewport: tuple[int, int], enlarge: bool) -> Image.Image:
    width, height = viewport
    scale = min(width / image.width, height / image.height)
    if not enlarge:
        scale = min(scale, 1.0)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS) if size != image.size else image


def render_frame(ds: Dataset, number: int, options: RenderOptions, max_decoded_bytes: int) -> bytes:
    """Frame `number` (1-based) of `ds` rendered as `options.media_type`.

    Raises
    ------
    FrameError
        If the frame does not exist or cannot be decoded.
    PixelDataMismatchError
        If the header promises frames or pixels the data does not hold.
    DecodeBudgetError
        If the frame is larger than `max_decoded_bytes` decoded.
    """
    check_frames(ds, [number])
    check_decode(ds, 1, max_decoded_bytes)
    if options.viewport is not None:  # the resized image (RGB at most) is held too
        width, height = options.viewport
        if width * height * 3 > max_decoded_bytes:
            raise DecodeBudgetError(
                f"a {width}x{height} viewport needs {width * height * 3} bytes; this service "
                f"renders at most {max_decoded_bytes} bytes per request"
            )
    try:
        arr = _frame_array(ds, number)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        raise FrameError(f"cannot decode the pixel data: {exc}") from exc
    display = to_display(ds, arr, options.window)
    image = Image.fromarray(display, "RGB" if display.ndim == 3 else "L")
    if options.viewport is not None:
        image = _fit(image, options.viewport, options.enlarge)
    buffer = BytesIO()
    if options.media_type == "image/png":
        image.save(buffer, "PNG")
    elif options.media_type == "image/gif":
        image.save(buffer, "GIF")
    else:
        image.save(buffer, "JPEG", quality=options.quality)
    return buffer.getvalue()


def thumbnail_options(options: RenderOptions) -> RenderOptions:
    viewport = options.viewport or (DEFAULT_THUMBNAIL, DEFAULT_THUMBNAIL)
    return RenderOptions(
        options.media_type,
        options.window,
        viewport,
        options.quality,
        enlarge=options.viewport is not None,
    )


# ---------------------------------------------------------------- bulk data

PIXEL_DATA_TAG = "7FE00010"


def parse_bulk_path(text: str) -> list[str | int]:
    """``<tag>[/<item>/<tag>...]`` -> [tag, item, tag, ...] (tags upper-case hex).

    >>> parse_bulk_path("00540016/0/00181078")
    ['00540016', 0, '00181078']
    """
    pieces = text.strip("/").split("/")
    if len(pieces) % 2 != 1:
        raise ValueError("a bulk data path is tag[/item/tag...]")
    out: list[str | int] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if len(piece) != 8 or any(c not in "0123456789abcdefABCDEF" for c in piece):
                raise ValueError(f"not a tag: {piece[:20]!r}")
            out.append(piece.upper())
        else:
            if not piece.isdigit():
                raise ValueError(f"not an item index: {piece[:20]!r}")
            out.append(int(piece))
    return out


def bulk_value(ds: Dataset, path: list[str | int]) -> bytes:
    """The bytes of the binary element at `path`.

    Raises
    ------
    KeyError
        If there is no such element or item.
    ValueError
        If the element is not binary.
    """
    current: Any = ds
    for i in range(0, len(path), 2):
        tag = int(str(path[i]), 16)
        if tag not in current:
            raise KeyError(f"no element {path[i]}")
        element = current[tag]
        if i + 1 < len(path):
            index = int(path[i + 1])
            if element.VR != "SQ" or index >= len(element.value):
                raise KeyError(f"no item {index} in {path[i]}")
            current = element.value[index]
        else:
            value = element.value
            if not isinstance(value, bytes | bytearray):
                raise ValueError(f"{path[i]} is not bulk data")
            return bytes(value)
    raise KeyError("empty path")
