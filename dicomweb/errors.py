"""HTTP errors of the DICOMweb service, answered as DICOM JSON with a failure reason."""

from __future__ import annotations

from typing import Any


class DicomWebError(Exception):
    """An error answered with `status` and a message (PS3.18 8.7.3: status + payload)."""

    status = 400

    def __init__(
        self, message: str, *, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        # ErrorComment (0000,0902) carries the human-readable reason.
        return {"00000902": {"vr": "LO", "Value": [self.message[:1024]]}}


class BadRequestError(DicomWebError):
    status = 400


class NotFoundError(DicomWebError):
    status = 404


class NotAcceptableError(DicomWebError):
    status = 406


class PayloadTooLargeError(DicomWebError):
    status = 413


class UnsupportedMediaTypeError(DicomWebError):
    status = 415


class ServiceUnavailableError(DicomWebError):
    """RFC 9110 15.6.4: the instance cannot be read now (archived, or a storage tier is
    down); with ``Retry-After`` when the archive said how long a restore takes."""

    status = 503


class InsufficientStorageError(DicomWebError):
    """RFC 4918 11.5: the archive would eat into its free-space reserve."""

    status = 507
