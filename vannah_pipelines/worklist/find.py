"""MWL C-FIND matching (PS3.4 K.6.1.2): a query identifier against worklist items.

Matching, sequence matching inside the Scheduled Procedure Step Sequence included, is
:mod:`vannah_pipelines.dicom.identifier` (shared with the Q/R SCP); this module adds the
worklist's top-level Modality key and builds the response identifiers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from vannah_pipelines.dicom.identifier import (
    SPECIFIC_CHARACTER_SET,
    IdentifierQuery,
    element_text,
)
from vannah_pipelines.dicom.identifier import compile_identifier as identify
from vannah_pipelines.dicom.matching import InvalidMatchError, Match, matches, parse_match
from vannah_pipelines.worklist.errors import InvalidIdentifierError
from vannah_pipelines.worklist.model import WorklistItem

_MODALITY = Tag(0x0008, 0x0060)
_SPS = Tag(0x0040, 0x0100)


@dataclass
class _Query:
    """The identifier's query, and the top-level Modality key it may carry: not an MWL
    top-level key, it asks for the first step's modality (docs/worklist.md)."""

    keys: IdentifierQuery
    modality: Match | None

    def apply(self, ds: Dataset) -> Dataset | None:
        """The response for `ds`, or None if `ds` does not match."""
        modality = ""
        if self.modality is not None:
            sps_items = ds[_SPS].value if _SPS in ds else []
            modality = sps_items[0].get("Modality", "") if sps_items else ""
            if not matches(self.modality, element_text(modality)):
                return None
        out = self.keys.apply(ds)
        if out is not None and self.modality is not None:
            out.add(DataElement(_MODALITY, "CS", modality or None))
        return out


def compile_identifier(identifier: Dataset) -> _Query:
    """Check a C-FIND identifier and turn it into a query.

    Raises
    ------
    InvalidIdentifierError
        For a value that cannot mean anything for its VR, or a sequence key with several
        items.
    """
    try:
        keys = identify(identifier, exclude=(_MODALITY,))
        modality = None
        if _MODALITY in identifier:
            modality = parse_match("CS", element_text(identifier[_MODALITY].value))
    except InvalidMatchError as exc:
        raise InvalidIdentifierError(str(exc)) from exc
    return _Query(keys, modality)


def find_items(items: Iterable[WorklistItem], identifier: Dataset) -> Iterator[Dataset]:
    """Yield one response identifier per item of `items` matching `identifier`.

    Requested keys are returned (empty when the item has no value); a sequence key with an
    item returns the matching items with the requested item keys; an empty sequence key
    returns the whole sequence. SpecificCharacterSet is returned when the item has one.

    Raises
    ------
    InvalidIdentifierError
        Before anything is yielded, if the identifier is malformed.
    """
    query = compile_identifier(identifier)
    return _answer(query, items)


def _answer(query: _Query, items: Iterable[WorklistItem]) -> Iterator[Dataset]:
    for item in items:
        response = answer_item(query, item)
        if response is not None:
            yield response


def answer_item(query: _Query, item: WorklistItem) -> Dataset | None:
    """The response identifier for `item` (a query from :func:`compile_identifier`), or
    None if it does not match; what :func:`find_items` yields for it."""
    response = query.apply(item.dataset)
    if response is None:
        return None
    charset = item.dataset.get(SPECIFIC_CHARACTER_SET)
    if charset is not None and charset.value:
        response.add(DataElement(SPECIFIC_CHARACTER_SET, "CS", charset.value))
    return response
