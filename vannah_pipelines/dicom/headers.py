"""Read what the catalog needs from a Part-10 file: headers only, pixels never decoded."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from vannah_pipelines.dicom.json_model import to_dicom_json
from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.errors import InvalidDicomError

# Binary values larger than this are left out of the header JSON (PS3.18 F.2.7 BulkDataURI).
BULK_DATA_THRESHOLD = 1024
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index, not an instance


class DicomDirError(InvalidDicomError):
    """The file is a DICOMDIR (PS3.10 media directory), not a composite instance."""


@dataclass(frozen=True)
class InstanceHeader:
    """A validated header: the parsed data set (no pixels), its JSON, size and checksum."""

    dataset: Dataset
    transfer_syntax_uid: str
    size_bytes: int
    checksum: str
    header_json: str
    attributes: dict[str, Any]  # the DICOM JSON model of header_json, keyed by tag

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        return str(self.dataset.StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.dataset.SeriesInstanceUID)


def _bulk_uri(_element: DataElement) -> str:
    return ""  # PS3.18 F.2.7: bulk data left out; DICOMweb serves it from the stored file


def read_header(path: Path, data: bytes | None = None) -> InstanceHeader:
    """Parse and validate the header of the DICOM file at `path`.

    Parameters
    ----------
    path
        A Part-10 file (a file without preamble or meta is read leniently).
    data
        Its bytes, if the caller has them already.

    Raises
    ------
    InvalidDicomError
        If the file is not DICOM, is truncated before the pixel data, or lacks one of the
        SOP Class, SOP Instance, Study and Series Instance UIDs (or one is not a UID).
    """
    if data is None:
        data = Path(path).read_bytes()
    try:
        # The whole file is parsed (pixel bytes are read, never decoded) so that a
        # truncated file is caught: pydicom itself reads short values silently.
        ds = pydicom.dcmread(BytesIO(data), force=True)
        meta_class = getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
        if meta_class == MEDIA_STORAGE_DIRECTORY:
            raise DicomDirError("a DICOMDIR media directory, not an instance")
        for keyword in REQUIRED_UIDS:
            value = ds.get(keyword)
            if value is None or value == "":
                raise InvalidDicomError(f"missing {keyword}")
            require_uid(str(value), keyword)
        check_complete(ds)
        attributes = to_dicom_json(ds, BULK_DATA_THRESHOLD, _bulk_uri)
        header_json = json.dumps(attributes, separators=(",", ":"))
    except InvalidDicomError:
        raise
    except (
        PydicomInvalidDicomError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        NotImplementedError,
    ) as exc:
        raise InvalidDicomError(f"unreadable DICOM: {type(exc).__name__}: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return InstanceHeader(
        dataset=ds,
        transfer_syntax_uid=syntax,
        size_bytes=len(data),
        checksum=hashlib.sha256(data).hexdigest(),
        header_json=header_json,
        attributes=attributes,
    )


_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def check_complete(ds: Dataset) -> None:
    """Raise InvalidDicomError if `ds` was read from a truncated file.

    Checks that every top-level value is as long as its header says, that an image (Rows,
    Columns, BitsAllocated) has pixel data, and that native pixel data is long enough.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.length != _UNDEFINED_LENGTH
            and raw.value is not None
            and len(raw.value) < raw.length
        ):
            raise InvalidDicomError(
                f"truncated: element {tag} has {len(raw.value)} of {raw.length} bytes"
            )
    if all(k in ds for k in ("Rows", "Columns", "BitsAllocated")):
        if not any(k in ds for k in _PIXEL_KEYWORDS):
            raise InvalidDicomError("truncated: image attributes but no pixel data")
        syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        if "PixelData" in ds and (syntax is None or not syntax.is_compressed):
            samples = int_value(ds, "SamplesPerPixel") or 1
            if text_value(ds, "PhotometricInterpretation") == "YBR_FULL_422":
                samples = 2  # PS3.3 C.7.6.3.1.2: chroma subsampled 2:1 horizontally
            expected = (
                (int_value(ds, "Rows") or 0)
                * (int_value(ds, "Columns") or 0)
                * (samples * (int_value(ds, "NumberOfFrames") or 1))
            )
            bits = int_value(ds, "BitsAllocated") or 0
            expected_bytes = (expected * bits + 7) // 8
            actual = len(ds.get_item("PixelData").value or b"")
            if actual < expected_bytes:
                raise InvalidDicomError(
                    f"truncated: pixel data has {actual} of {expected_bytes} bytes"
                )


def json_text(attributes: dict[str, Any], tag: str) -> str | None:
    """A DICOM JSON attribute as catalog text: multi-values joined by ``\\``, person names
    as ``Alphabetic=Ideographic=Phonetic``, or None when absent or empty.

    >>> json_text({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J"}]}}, "00100010")
    'Doe^J'
    >>> json_text({"00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]}}, "00080008")
    'ORIGINAL\\\\PRIMARY'
    """
    element = attributes.get(tag)
    if not element or "Value" not in element:
        return None
    parts = []
    for value in element["Value"]:
        if isinstance(value, dict):  # PN
            groups = [value.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
            while groups and not groups[-1]:
                groups.pop()
            parts.append("=".join(groups))
        elif value is None:
            parts.append("")
        else:
            parts.append(str(value))
    text = "\\".join(parts)
    return text or None


def json_int(attributes: dict[str, Any], tag: str) -> int | None:
    """The first value of an integer attribute (IS, US, ...), or None."""
    element = attributes.get(tag)
    if not element or not element.get("Value"):
        return None
    try:
        return int(element["Value"][0])
    except (TypeError, ValueError):
        return None


def text_value(ds: Dataset, keyword: str) -> str | None:
    """The value of `keyword` as catalog text (multi-values joined with ``\\``), or None.

    >>> from pydicom import Dataset
    >>> ds = Dataset(); ds.ImageType = ["ORIGINAL", "PRIMARY"]; ds.PatientName = "Doe^J"
    >>> text_value(ds, "ImageType"), text_value(ds, "PatientName"), text_value(ds, "Modality")
    ('ORIGINAL\\\\PRIMARY', 'Doe^J', None)
    """
    try:
        value: Any = ds.get(keyword)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        return None  # an invalid value is kept in header_json, not as a typed column
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    if isinstance(value, PersonName):
        return str(value)
    return str(value)


def int_value(ds: Dataset, keyword: str) -> int | None:
    """The value of an integer-like `keyword` (IS, US, ...), or None if absent or invalid."""
    try:
        value: Any = ds.get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, MultiValue | list):
            value = value[0]
        return int(value)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        return None
