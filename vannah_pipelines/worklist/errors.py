"""Errors of the worklist package; each boundary maps them once (DIMSE, HTTP, HL7 ACK, CLI)."""

from __future__ import annotations

from vannah_pipelines.errors import VannahError


class WorklistError(VannahError):
    """Base class of the worklist errors."""


class InvalidItemError(WorklistError):
    """A worklist item (REST body, .wl file, dump, HL7 order) lacks or garbles what is required.

    ``reasons`` lists every problem found, each one line.
    """

    def __init__(self, reasons: list[str] | str) -> None:
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        super().__init__("; ".join(self.reasons))


class StepNotFoundError(WorklistError):
    """No scheduled procedure step has this id."""


class StepExistsError(WorklistError):
    """A create named a step id that is already stored."""


class InvalidIdentifierError(WorklistError):
    """A C-FIND identifier that cannot mean anything (bad range, UID, several SPS items)."""
