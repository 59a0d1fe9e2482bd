"""Every DIMSE status the receiver returns (PS3.4 B.2.3, PS3.7 C); no bare hex elsewhere."""

from __future__ import annotations

from enum import IntEnum


class VerificationStatus(IntEnum):
    """C-ECHO statuses (PS3.4 A.4)."""

    SUCCESS = 0x0000


class StoreStatus(IntEnum):
    """C-STORE statuses of the Storage Service Class (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    # PS3.7 C.4.2: a general failure, for faults of ours that fit no specific status.
    PROCESSING_FAILURE = 0x0110
    # PS3.4 B.2.3: Refused, Out of Resources (disk full, file too large, no permission).
    OUT_OF_RESOURCES = 0xA700
    # PS3.4 B.2.3: Error, Data Set does not match SOP Class (missing or malformed UIDs).
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # PS3.4 B.2.3: Error, Cannot understand (the data set cannot be parsed).
    CANNOT_UNDERSTAND = 0xC000
