"""Which presentation contexts a C-STORE SCU proposes, and what it sends on those the peer
accepted: the stored bytes when it took the stored transfer syntax, else the instance
decompressed or re-encoded into an uncompressed syntax it took (PS3.8 9.3.2.2, PS3.5 10).

Shared by the receiver's C-MOVE and C-GET sub-operations and by :mod:`.outbound`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom.dsutils import encode

from vannah_pipelines.dicom.transcoding import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    transcode,
    transcode_reason,
)
from vannah_pipelines.dimse.store_scu import data_set_offset
from vannah_pipelines.errors import VannahError

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)
UNCOMPRESSED = frozenset({IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE})
# The fallback context proposed for every SOP class, in our order of preference: a stored
# uncompressed file is re-encoded into it, a compressed one decompressed.
FALLBACK_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE)
# Pixel budget of one decompression for a peer that takes uncompressed syntaxes only
# (the same default as DICOMweb's dicomweb_max_decoded_bytes).
DEFAULT_MAX_DECODED_BYTES = 256 * 1024**2


class NotSendableError(VannahError):
    """The instance cannot be sent on this association: the peer accepted neither its
    stored transfer syntax nor one it can be converted to, or the conversion failed. The
    message is the reason, short enough for an Error Comment (64 characters)."""


def proposals(instances: Iterable[tuple[str, str]]) -> list[tuple[str, tuple[str, ...]]]:
    """The presentation contexts to propose for (SOP class, stored transfer syntax) pairs:
    each pair alone (so the stored bytes can go as they are), then one context per SOP
    class offering the uncompressed :data:`FALLBACK_SYNTAXES`. Callers propose at most
    :data:`MAX_CONTEXTS` of them; the fallbacks come last.

    >>> proposals([("1.2.3", "1.2.840.10008.1.2.5"), ("1.2.3", "1.2.840.10008.1.2.1")])
    ... # doctest: +NORMALIZE_WHITESPACE
    [('1.2.3', ('1.2.840.10008.1.2.1',)), ('1.2.3', ('1.2.840.10008.1.2.5',)),
     ('1.2.3', ('1.2.840.10008.1.2.1', '1.2.840.10008.1.2'))]
    """
    pairs = sorted(set(instances))
    exact: list[tuple[str, tuple[str, ...]]] = [(sop, (ts,)) for sop, ts in pairs]
    fallback = sorted({sop for sop, _ts in pairs})
    return exact + [(sop, FALLBACK_SYNTAXES) for sop in fallback]


def prepare(
    fp: BinaryIO,
    stored_syntax: str,
    accepted: Sequence[str],
    *,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> tuple[str, BinaryIO]:
    """The transfer syntax to send the Part-10 stream `fp` in, and its data set: the stored
    bytes untouched (`fp` positioned after the file meta) when the peer accepted
    `stored_syntax`; else an uncompressed file re-encoded in an accepted uncompressed
    syntax (the same elements, not the same bytes); else a compressed one decompressed to
    Explicit or Implicit VR Little Endian, within `max_decoded_bytes` of pixel data.

    Parameters
    ----------
    fp
        A seekable Part-10 stream.
    stored_syntax
        Its transfer syntax (the file meta's).
    accepted
        The transfer syntaxes the peer accepted for its SOP class.

    Raises
    ------
    NotSendableError
        If no accepted syntax fits, or decompression fails (no decoder, over the budget,
        a corrupt codestream).
    InvalidDicomError
        If `fp` has no Part-10 header.
    """
    data_set_offset(fp)
    if stored_syntax in accepted:
        return stored_syntax, fp
    if stored_syntax in UNCOMPRESSED:
        others = [ts for ts in (*FALLBACK_SYNTAXES, EXPLICIT_BE) if ts in accepted]
        if not others:
            raise NotSendableError(f"peer accepts neither {stored_syntax} nor uncompressed")
        return others[0], BytesIO(_reencode(fp, others[0]))
    targets = [ts for ts in FALLBACK_SYNTAXES if ts in accepted]
    if not targets:
        raise NotSendableError(f"peer accepts neither {stored_syntax} nor uncompressed")
    target = targets[0]
    reason = transcode_reason(stored_syntax, target)
    if reason is not None:
        raise NotSendableError(f"not decompressed: no decoder for {stored_syntax}")
    fp.seek(0)
    try:
        part10 = transcode(fp, target, max_decoded_bytes)
    except (ValueError, OSError, EOFError) as exc:  # PixelError is a ValueError
        log.warning("decompressing %s to %s failed: %s", stored_syntax, target, exc)
        raise NotSendableError(f"decompression of {stored_syntax} failed") from exc
    data = BytesIO(part10)
    data_set_offset(data)
    return target, data


def _reencode(fp: BinaryIO, syntax: str) -> bytes:
    """The data set of the uncompressed Part-10 stream `fp` encoded in `syntax`."""
    ts = UID(syntax)
    fp.seek(0)
    data = encode(dcmread(fp), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if data is None:
        raise NotSendableError(f"cannot encode in {syntax}")
    return data
