"""Free-space reserve: refuse a write before the disk is full, never after half a file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from vannah_pipelines.errors import InsufficientSpaceError


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def require_free_space(path: Path, needed: int, reserve: int) -> None:
    """Raise unless writing `needed` more bytes under `path` leaves `reserve` bytes free.

    Parameters
    ----------
    path
        An existing folder on the file system that will hold the write.
    needed
        Bytes about to be written (0 when unknown yet: only the reserve is checked).
    reserve
        Bytes that must stay free (``Settings.free_space_reserve_bytes``).

    Raises
    ------
    InsufficientSpaceError
        If the write would eat into the reserve.

    >>> require_free_space(Path("."), 0, 0)
    >>> require_free_space(Path("."), 0, 2**62)
    Traceback (most recent call last):
    ...
    vannah_pipelines.errors.InsufficientSpaceError: not enough free disk space ...
    """
    available = free_bytes(path)
    if available - needed < reserve:
        raise InsufficientSpaceError(
            f"not enough free disk space under {path}: {available // 2**20} MiB free, "
            f"{needed // 2**20} MiB to write, {reserve // 2**20} MiB kept in reserve"
        )


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or its cause) is the file system saying it is full or over quota."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, InsufficientSpaceError):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False
