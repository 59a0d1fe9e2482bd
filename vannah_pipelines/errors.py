"""Errors raised by the framework-free layer.

Each boundary maps them once: DIMSE status, HTTP status, Dagster failure.
"""

from __future__ import annotations


class VannahError(Exception):
    """Base class of every error the pure layer raises on purpose."""


class ConfigError(VannahError):
    """The settings file or environment is invalid, or enables something not yet implemented."""


class InvalidDicomError(VannahError):
    """A DICOM object cannot be read, or lacks what the archive requires (UIDs, SOP class)."""


class UnsafeUidError(InvalidDicomError):
    """A value used as a UID is not a PS3.5 UID (and so must never become a path component)."""

    def __init__(self, value: object, attribute: str = "UID") -> None:
        self.value = value
        self.attribute = attribute
        shown = repr(value)[:80]
        super().__init__(f"{attribute} is not a valid DICOM UID: {shown}")


class LandingError(VannahError):
    """The landing zone cannot accept a write (disk full, permissions)."""


class CatalogError(VannahError):
    """The catalog is missing, inconsistent or cannot be written."""


class StorageError(VannahError):
    """A storage backend failed to put, open, stat or delete an object."""


class NotFoundError(StorageError):
    """The object does not exist in the storage tier asked."""


class StorageUnavailableError(StorageError):
    """A storage tier cannot be reached or answers it is busy (a server down, a timeout,
    an HTTP 5xx): the same read may succeed later."""


class ChecksumMismatchError(StorageError):
    """Bytes read or stored do not hash to the catalog's SHA-256: nothing was kept."""


class ArchivedError(StorageError):
    """The object is in an archive storage class: it must be restored before it is read."""

    def __init__(self, message: str, *, restoring: bool = False) -> None:
        super().__init__(message)
        self.restoring = restoring


class ViewerFetchError(VannahError):
    """The built-in viewer's package could not be downloaded, verified or extracted."""


class InsufficientSpaceError(LandingError):
    """Writing would eat into the free-space reserve (or the disk is full): refuse, retry later."""


class AuthenticationError(VannahError):
    """No credential, or one that is not valid (unknown, tampered, expired): HTTP 401.

    `bearer_error` is the RFC 6750 error code for a ``WWW-Authenticate: Bearer`` challenge
    (``invalid_request`` when none was sent, ``invalid_token`` otherwise).
    """

    def __init__(self, message: str, bearer_error: str = "invalid_token") -> None:
        super().__init__(message)
        self.bearer_error = bearer_error


class PermissionDeniedError(VannahError):
    """A valid credential that is not allowed to do this: HTTP 403."""
