"""MWL C-FIND matching (PS3.4 K.6.1.2): a query identifier against worklist items.

Attribute matching is :mod:`vannah_pipelines.dicom.matching` (the one PS3.4 C.2.2.2
matcher); this module only walks the identifier, including sequence matching inside the
Scheduled Procedure Step Sequence, and builds the response identifiers.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from vannah_pipelines.dicom.matching import (
    InvalidMatchError,
    Match,
    Universal,
    matches,
    parse_match,
)
from vannah_pipelines.worklist.errors import InvalidIdentifierError
from vannah_pipelines.worklist.model import WorklistItem

_SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
_MODALITY = Tag(0x0008, 0x0060)
_SPS = Tag(0x0040, 0x0100)


@dataclass
class _Key:
    tag: BaseTag
    vr: str
    match: Match = field(default_factory=Universal)
    sub: _Query | None = None  # a sequence key with one item
    whole_sequence: bool = False  # a sequence key with no item: return every item whole
    echo_sps_modality: bool = False  # top-level Modality (see docs/worklist.md)


@dataclass
class _Query:
    keys: list[_Key]

    @property
    def has_conditions(self) -> bool:
        return any(
            not isinstance(k.match, Universal) or (k.sub is not None and k.sub.has_conditions)
            for k in self.keys
        )

    def apply(self, ds: Dataset) -> Dataset | None:
        """The response for `ds`, or None if `ds` does not match."""
        out = Dataset()
        for key in self.keys:
            if key.echo_sps_modality:
                sps_items = ds[_SPS].value if _SPS in ds else []
                modality = sps_items[0].get("Modality", "") if sps_items else ""
                if not matches(key.match, _text(modality)):
                    return None
                out.add(DataElement(key.tag, "CS", modality or None))
                continue
            elem = ds.get(key.tag)
            if key.whole_sequence or key.sub is not None:
                stored = list(elem.value) if elem is not None and elem.VR == "SQ" else []
                if key.whole_sequence:
                    out.add(DataElement(key.tag, "SQ", Sequence(copy.deepcopy(stored))))
                    continue
                assert key.sub is not None
                answered = [r for r in (key.sub.apply(i) for i in stored) if r is not None]
                if not answered and key.sub.has_conditions:
                    return None
                out.add(DataElement(key.tag, "SQ", Sequence(answered)))
                continue
            value = elem.value if elem is not None else None
            if not matches(key.match, _text(value)):
                return None
            out.add(DataElement(key.tag, elem.VR if elem is not None else key.vr, value))
        return out


def _text(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[attr-defined]
    return str(value)


def _compile(identifier: Dataset, *, top: bool) -> _Query:
    keys: list[_Key] = []
    for elem in identifier:
        tag = elem.tag
        if tag.element == 0 or tag.group in (0x0000, 0x0002) or tag == _SPECIFIC_CHARACTER_SET:
            continue
        vr = elem.VR
        if vr in ("UN", "OB", "OW") and not tag.is_private:
            with contextlib.suppress(KeyError):
                vr = dictionary_VR(tag)
        name = elem.keyword or str(tag)
        if vr == "SQ":
            items = list(elem.value or [])
            if len(items) > 1:
                # PS3.4 C.2.2.2.6: a sequence key holds a single item.
                raise InvalidIdentifierError(f"{name}: a sequence key holds at most one item")
            if not items or len(items[0]) == 0:
                # PS3.4 C.2.2.2.6: no item, or one empty item, is universal matching of the
                # sequence: every item is returned whole.
                keys.append(_Key(tag, vr, whole_sequence=True))
            else:
                keys.append(_Key(tag, vr, sub=_compile(items[0], top=False)))
            continue
        try:
            match = parse_match(vr, _text(elem.value))
        except InvalidMatchError as exc:
            raise InvalidIdentifierError(f"{name}: {exc}") from exc
        key = _Key(tag, vr, match)
        if top and tag == _MODALITY:
            # Not an MWL top-level key: it asks for the SPS modality (docs/worklist.md).
            key.echo_sps_modality = True
        keys.append(key)
    return _Query(keys)


def compile_identifier(identifier: Dataset) -> _Query:
    """Check a C-FIND identifier and turn it into a query.

    Raises
    ------
    InvalidIdentifierError
        For a value that cannot mean anything for its VR, or a sequence key with several
        items.
    """
    return _compile(identifier, top=True)


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
        response = query.apply(item.dataset)
        if response is None:
            continue
        charset = item.dataset.get(_SPECIFIC_CHARACTER_SET)
        if charset is not None and charset.value:
            response.add(DataElement(_SPECIFIC_CHARACTER_SET, "CS", charset.value))
        yield response
