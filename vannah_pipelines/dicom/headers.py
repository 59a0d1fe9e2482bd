"""Read what the catalog needs from a Part-10 file: headers only, pixels never decoded."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

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
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=True)
        meta_class = getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
        if meta_class == MEDIA_STORAGE_DIRECTORY:
            raise DicomDirError("a DICOMDIR media directory, not an instance")
        for keyword in REQUIRED_UIDS:
            value = ds.get(keyword)
            if value is None or value == "":
                raise InvalidDicomError(f"missing {keyword}")
            require_uid(str(value), keyword)
        header_json = json.dumps(
            ds.to_json_dict(BULK_DATA_THRESHOLD, _bulk_uri, suppress_invalid_tags=True),
            separators=(",", ":"),
        )
    except InvalidDicomError:
        raise
    except (PydicomInvalidDicomError, EOFError, ValueError, TypeError, KeyError,
            AttributeError, OverflowError, NotImplementedError) as exc:
        raise InvalidDicomError(f"unreadable DICOM: {type(exc).__name__}: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return InstanceHeader(
        dataset=ds,
        transfer_syntax_uid=syntax,
        size_bytes=len(data),
        checksum=hashlib.sha256(data).hexdigest(),
        header_json=header_json,
    )


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
