"""Presentation contexts the receiver accepts: Verification, every standard storage SOP class,
the Patient Root and Study Root Query/Retrieve FIND, MOVE and GET SOP classes, Modality
Worklist, and Storage Commitment Push Model."""

from __future__ import annotations

from dataclasses import dataclass

import pydicom.uid
from pynetdicom import AllStoragePresentationContexts

# Data sets are stored exactly as received, so any of these is accepted and never re-encoded.
# In order of preference: pynetdicom accepts, for each proposed context, the first of these
# the peer proposed. Explicit VR Little Endian first (what most files are, so a sender need
# not convert, and C-GET sends them as stored), then implicit, then the lossless compressed
# syntaxes, and lossy ones last, so a sender offering several is never pushed into lossy
# compression of an uncompressed image.
_TRANSFER_SYNTAX_NAMES = (
    "ExplicitVRLittleEndian",
    "ImplicitVRLittleEndian",
    "JPEGLosslessSV1",  # Process 14, selection value 1
    "JPEGLossless",  # Process 14
    "JPEGLSLossless",
    "JPEG2000Lossless",
    "RLELossless",
    "HTJ2KLossless",
    "HTJ2KLosslessRPCL",
    "DeflatedExplicitVRLittleEndian",
    "ExplicitVRBigEndian",
    "JPEGBaseline8Bit",
    "JPEGExtended12Bit",
    "JPEGLSNearLossless",
    "JPEG2000",
    "HTJ2K",
)

# HTJ2K only exists in recent pydicom versions; take what this pydicom knows.
TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    str(getattr(pydicom.uid, name)) for name in _TRANSFER_SYNTAX_NAMES if hasattr(pydicom.uid, name)
)

# Verification, query/retrieve and worklist identifiers: the uncompressed syntaxes.
UNCOMPRESSED_SYNTAXES: tuple[str, ...] = (
    str(pydicom.uid.ExplicitVRLittleEndian),
    str(pydicom.uid.ImplicitVRLittleEndian),
    str(pydicom.uid.ExplicitVRBigEndian),
)

STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)

VERIFICATION_SOP_CLASS: str = "1.2.840.10008.1.1"  # PS3.4 A.4
MODALITY_WORKLIST_FIND: str = "1.2.840.10008.5.1.4.31"  # PS3.4 K.6.1
STORAGE_COMMITMENT_PUSH: str = "1.2.840.10008.1.20.1"  # PS3.4 J.3.5

# PS3.4 C.6.1.3 and C.6.2.3: the Q/R information models' SOP classes.
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT = frozenset({PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET})
QR_SOP_CLASSES: tuple[str, ...] = (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_MOVE,
    PATIENT_ROOT_GET,
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
    STUDY_ROOT_GET,
)
RETRIEVE_SOP_CLASSES = frozenset(
    {PATIENT_ROOT_MOVE, PATIENT_ROOT_GET, STUDY_ROOT_MOVE, STUDY_ROOT_GET}
)


@dataclass(frozen=True)
class SupportedContext:
    """One abstract syntax, its transfer syntaxes, and whether SCP/SCU role selection
    proposals are accepted (a C-GET SCU asks to act as Storage SCP on its association)."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    accepts_role_selection: bool = False


def supported_contexts() -> list[SupportedContext]:
    """The presentation contexts the receiver supports."""
    contexts = [SupportedContext(VERIFICATION_SOP_CLASS, UNCOMPRESSED_SYNTAXES)]
    # C-STORE behaviour is unchanged; role selection only lets a C-GET SCU receive.
    contexts.extend(
        SupportedContext(sop_class, TRANSFER_SYNTAXES, accepts_role_selection=True)
        for sop_class in STORAGE_SOP_CLASSES
    )
    # Identifiers are small: the uncompressed syntaxes suffice.
    contexts.extend(SupportedContext(sop, UNCOMPRESSED_SYNTAXES) for sop in QR_SOP_CLASSES)
    contexts.append(SupportedContext(MODALITY_WORKLIST_FIND, UNCOMPRESSED_SYNTAXES))
    # PS3.4 J.3.3.1.3: a Storage Commitment SCP reporting on an association of its own
    # proposes the SCP role; accepting role selection lets it.
    contexts.append(
        SupportedContext(
            STORAGE_COMMITMENT_PUSH, UNCOMPRESSED_SYNTAXES, accepts_role_selection=True
        )
    )
    return contexts
