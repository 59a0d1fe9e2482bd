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
    # PS3.7 C.5.4: Refused, Not Authorized (the association's principal may not store).
    NOT_AUTHORIZED = 0x0124
    # PS3.4 B.2.3: Refused, Out of Resources (disk full, file too large, no permission).
    OUT_OF_RESOURCES = 0xA700
    # PS3.4 B.2.3: Error, Data Set does not match SOP Class (missing or malformed UIDs).
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # PS3.4 B.2.3: Error, Cannot understand (the data set cannot be parsed).
    CANNOT_UNDERSTAND = 0xC000


class FindStatus(IntEnum):
    """C-FIND statuses of the Query/Retrieve Service Class (PS3.4 C.4.1.1.4)."""

    SUCCESS = 0x0000
    # Matches are continuing; the Identifier holds one match.
    PENDING = 0xFF00
    # Matches are continuing, but one or more Optional Keys were not supported for matching.
    PENDING_WARNING = 0xFF01
    # Matching terminated due to a C-CANCEL request.
    CANCEL = 0xFE00
    # PS3.7 C.5.4: Refused, Not Authorized (the association's principal may not read).
    NOT_AUTHORIZED = 0x0124
    # Refused: Out of Resources.
    OUT_OF_RESOURCES = 0xA700
    # Error: Identifier does not match SOP Class (missing/invalid level, hierarchy broken).
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Failed: Unable to process (a value that cannot be matched, an internal fault).
    UNABLE_TO_PROCESS = 0xC000


class RetrieveStatus(IntEnum):
    """C-MOVE and C-GET statuses (PS3.4 C.4.2.1.5 and C.4.3.1.4)."""

    SUCCESS = 0x0000
    # Sub-operations are continuing.
    PENDING = 0xFF00
    # Sub-operations terminated due to a C-CANCEL request.
    CANCEL = 0xFE00
    # PS3.7 C.5.4: Refused, Not Authorized (the association's principal may not read).
    NOT_AUTHORIZED = 0x0124
    # Warning: sub-operations complete, one or more failures or warnings.
    SUBOPERATIONS_FAILED = 0xB000
    # Refused: Out of Resources, unable to calculate the number of matches.
    UNABLE_TO_CALCULATE_MATCHES = 0xA701
    # Refused: Out of Resources, unable to perform sub-operations (every one failed).
    UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702
    # Refused: Move Destination unknown (C-MOVE only).
    MOVE_DESTINATION_UNKNOWN = 0xA801
    # Error: Identifier does not match SOP Class.
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Failed: Unable to process.
    UNABLE_TO_PROCESS = 0xC000


class WorklistFindStatus(IntEnum):
    """C-FIND statuses of the Basic Worklist Management Service (PS3.4 K.4.1.1.4)."""

    SUCCESS = 0x0000
    CANCEL = 0xFE00
    PENDING = 0xFF00
    # Refused: out of resources (the worklist store cannot be read).
    OUT_OF_RESOURCES = 0xA700
    # Error: Identifier does not match SOP Class (a key value that means nothing for its VR).
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Failed: unable to process (the identifier cannot be decoded).
    UNABLE_TO_PROCESS = 0xC000


class CommitmentStatus(IntEnum):
    """N-ACTION statuses of the Storage Commitment Push Model SCP (PS3.7 10.1.4.1.10,
    PS3.4 J.3.2.1.3); the N-EVENT-REPORT answers are in ``vannah_pipelines.dimse.commitment``."""

    SUCCESS = 0x0000
    # A fault of ours (the request cannot be recorded).
    PROCESSING_FAILURE = 0x0110
    # No Transaction UID, no or malformed Referenced SOP Sequence.
    INVALID_ARGUMENT_VALUE = 0x0115
    # Requested SOP Class is not the Push Model.
    NO_SUCH_SOP_CLASS = 0x0118
    # Action Type ID other than 1.
    NO_SUCH_ACTION = 0x0123
    # The association's principal may neither read nor store.
    NOT_AUTHORIZED = 0x0124
    # More references than one request may hold, or too many results queued.
    RESOURCE_LIMITATION = 0x0213
