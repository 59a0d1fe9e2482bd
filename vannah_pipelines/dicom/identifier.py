"""A C-FIND identifier matched against one data set, sequences included (PS3.4 C.2.2.2).

Attribute matching is :mod:`vannah_pipelines.dicom.matching` (the one PS3.4 C.2.2.2
matcher); this module walks an identifier and a candidate data set together: each key
matches its element, and a sequence key matches when at least one item of the stored
sequence matches every key of the identifier's single item (C.2.2.2.6). The Modality
Worklist SCP applies it to worklist items, the Q/R SCP to stored headers for the keys the
catalog does not hold as columns.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Collection
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

SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)


@dataclass
class IdentifierKey:
    """One key: its matcher, or for a sequence the query of its single item."""

    tag: BaseTag
    vr: str
    match: Match = field(default_factory=Universal)
    item: IdentifierQuery | None = None  # a sequence key with one (non-empty) item
    whole_sequence: bool = False  # a sequence key with no item: return every item whole


@dataclass
class IdentifierQuery:
    """The keys of an identifier (or of a sequence key's item), in tag order."""

    keys: list[IdentifierKey]

    @property
    def has_conditions(self) -> bool:
        """Whether some key (at any depth) restricts the answer."""
        return any(
            not isinstance(k.match, Universal) or (k.item is not None and k.item.has_conditions)
            for k in self.keys
        )

    def apply(self, ds: Dataset) -> Dataset | None:
        """The keys' elements as `ds` holds them (empty when it has none), or None if `ds`
        does not match. A sequence key returns the matching items with the item's keys."""
        out = Dataset()
        for key in self.keys:
            elem = ds.get(key.tag)
            if key.whole_sequence or key.item is not None:
                stored = list(elem.value) if elem is not None and elem.VR == "SQ" else []
                if key.item is None:
                    out.add(DataElement(key.tag, "SQ", Sequence(copy.deepcopy(stored))))
                    continue
                answered = [r for r in (key.item.apply(i) for i in stored) if r is not None]
                if not answered and key.item.has_conditions:
                    return None
                out.add(DataElement(key.tag, "SQ", Sequence(answered)))
                continue
            value = elem.value if elem is not None else None
            if not matches(key.match, element_text(value)):
                return None
            out.add(DataElement(key.tag, elem.VR if elem is not None else key.vr, value))
        return out


def element_text(value: object) -> str | None:
    """An element value as the matcher reads it: text, multiple values joined by ``\\``."""
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[attr-defined]
    return str(value)


def compile_identifier(
    identifier: Dataset, *, exclude: Collection[BaseTag] = ()
) -> IdentifierQuery:
    """The query of `identifier`'s keys (command, meta, group-length and
    SpecificCharacterSet elements skipped; `exclude` skips more at the top level).

    Raises
    ------
    InvalidMatchError
        For a value that cannot mean anything for its VR, or a sequence key with several
        items; the message names the key.
    """
    keys: list[IdentifierKey] = []
    for elem in identifier:
        tag = elem.tag
        if tag.element == 0 or tag.group in (0x0000, 0x0002) or tag == SPECIFIC_CHARACTER_SET:
            continue
        if tag in exclude:
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
                raise InvalidMatchError(f"{name}: a sequence key holds at most one item")
            if not items or len(items[0]) == 0:
                # PS3.4 C.2.2.2.6: no item, or one empty item, is universal matching of the
                # sequence: every item is returned whole.
                keys.append(IdentifierKey(tag, vr, whole_sequence=True))
            else:
                keys.append(IdentifierKey(tag, vr, item=compile_identifier(items[0])))
            continue
        try:
            match = parse_match(vr, element_text(elem.value))
        except InvalidMatchError as exc:
            raise InvalidMatchError(f"{name}: {exc}") from exc
        keys.append(IdentifierKey(tag, vr, match))
    return IdentifierQuery(keys)
