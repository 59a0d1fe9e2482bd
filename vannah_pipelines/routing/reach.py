"""Whether a routing destination answers, without sending anything: C-ECHO for a DICOM AE
(through the function the caller passes: the pure layer does not speak DIMSE), a listing
of the bucket for S3, a QIDO-RS query for STOW-RS, a writable folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from vannah_pipelines.routing.rules import (
    DicomDestination,
    FolderDestination,
    S3Destination,
    StowDestination,
)
from vannah_pipelines.routing.senders import S3Sender, auth_headers

# (destination, calling AE title, timeout) -> (answered, detail)
Echo = Callable[[DicomDestination, str, float], tuple[bool, str]]


def check_destination(
    destination: DicomDestination | S3Destination | StowDestination | FolderDestination,
    *,
    secrets: Mapping[str, str],
    calling_aet: str,
    echo: Echo | None = None,
    timeout: float = 10.0,
) -> tuple[bool, str]:
    """(reachable, what was found). Never raises for a destination that is down."""
    try:
        if isinstance(destination, DicomDestination):
            if echo is None:
                return False, "no C-ECHO function given"
            return echo(destination, calling_aet, timeout)
        if isinstance(destination, FolderDestination):
            path = Path(destination.path)
            if not path.is_dir():
                return False, f"{path} is not a folder"
            if not os.access(path, os.W_OK | os.X_OK):
                return False, f"{path} is not writable"
            return True, "writable folder"
        if isinstance(destination, S3Destination):
            sender = S3Sender(destination, secrets=secrets, timeout=timeout)
            try:
                next(iter(sender.storage.keys()), None)
            finally:
                sender.close()
            return True, f"bucket {destination.bucket} listed"
        import requests  # only STOW-RS destinations need it

        response = requests.get(
            f"{destination.url}/studies",
            params={"limit": "1"},
            headers={"Accept": "application/dicom+json", **auth_headers(destination, secrets)},
            timeout=timeout,
        )
        ok = response.status_code < 400 or response.status_code == 404
        return ok, f"QIDO-RS answered HTTP {response.status_code}"
    except Exception as exc:  # down, refused, a client library's own error: say which
        return False, f"{type(exc).__name__}: {str(exc)[:300]}"
