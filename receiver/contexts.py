"""Presentation contexts the receiver accepts: Verification and every standard storage SOP class."""

from __future__ import annotations

import pydicom.uid
from pynetdicom import AllStoragePresentationContexts

# Data sets are stored exactly as received, so any of these is accepted and never re-encoded.
_TRANSFER_SYNTAX_NAMES = (
    "ImplicitVRLittleEndian",
    "ExplicitVRLittleEndian",
    "ExplicitVRBigEndian",
    "DeflatedExplicitVRLittleEndian",
    "JPEGBaseline8Bit",
    "JPEGExtended12Bit",
    "JPEGLossless",  # Process 14
    "JPEGLosslessSV1",  # Process 14, selection value 1
    "JPEGLSLossless",
    "JPEGLSNearLossless",
    "JPEG2000Lossless",
    "JPEG2000",
    "RLELossless",
    "HTJ2KLossless",
    "HTJ2KLosslessRPCL",
    "HTJ2K",
)

# HTJ2K only exists in recent pydicom versions; take what this pydicom knows.
TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    str(getattr(pydicom.uid, name)) for name in _TRANSFER_SYNTAX_NAMES if hasattr(pydicom.uid, name)
)

STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)

VERIFICATION_SOP_CLASS: str = "1.2.840.10008.1.1"  # PS3.4 A.4


def supported_contexts() -> list[tuple[str, tuple[str, ...]]]:
    """Return ``(abstract syntax, transfer syntaxes)`` pairs the receiver supports."""
    pairs = [(VERIFICATION_SOP_CLASS, TRANSFER_SYNTAXES[:3])]
    pairs.extend((sop_class, TRANSFER_SYNTAXES) for sop_class in STORAGE_SOP_CLASSES)
    return pairs
