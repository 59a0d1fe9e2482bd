"""Worklist files: DICOM ``.wl`` files and DCMTK dump text (``dcmdump`` / ``dump2dcm`` format).

The dump reader is pure Python: one ``(gggg,eeee) VR value`` per line, ``[...]`` around
text values (optional, as in DCMTK's example worklists), ``#`` comments, items opened by
``(fffe,e000)`` and closed by ``(fffe,e00d)``, sequences closed by ``(fffe,e0dd)``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from vannah_pipelines.worklist.errors import InvalidItemError
from vannah_pipelines.worklist.model import WorklistItem, item_from_dataset

DUMP_SUFFIXES = frozenset({".dump", ".txt"})
WORKLIST_SUFFIXES = frozenset({".wl", ".dcm", ".dicom"}) | DUMP_SUFFIXES

_LINE = re.compile(r"\(([0-9a-fA-F]{4}),([0-9a-fA-F]{4})\)\s+([A-Za-z]{2})?\s*(.*)")
_ITEM, _ITEM_END, _SEQ_END = Tag(0xFFFE, 0xE000), Tag(0xFFFE, 0xE00D), Tag(0xFFFE, 0xE0DD)
_NUMERIC_VRS = {"US": int, "SS": int, "UL": int, "SL": int, "FL": float, "FD": float}


def _value(rest: str) -> str:
    """The value text of a dump line after its VR."""
    rest = rest.strip()
    if rest.startswith("["):
        end = rest.find("]")
        return rest[1:end] if end >= 0 else rest[1:]
    if rest.startswith("(no value"):
        return ""
    return rest.split("#", 1)[0].strip()


def parse_dump(text: str, source: str = "<dump>") -> Dataset:
    """Parse DCMTK dump text into a data set.

    Raises
    ------
    InvalidItemError
        Naming the line, for a line that is not an element, an unbalanced item or
        sequence, or a value that does not fit its VR.
    """
    root = Dataset()
    stack: list[Dataset] = [root]
    open_seqs: list[Sequence] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        found = _LINE.match(line)
        if found is None:
            raise InvalidItemError(f"{source}:{number}: not a dump element line")
        tag = Tag(int(found.group(1), 16), int(found.group(2), 16))
        vr = (found.group(3) or "").upper()
        rest = found.group(4)
        if tag == _ITEM:
            if not open_seqs:
                raise InvalidItemError(f"{source}:{number}: item outside a sequence")
            item = Dataset()
            open_seqs[-1].append(item)
            stack.append(item)
            continue
        if tag == _ITEM_END:
            if len(stack) < 2:
                raise InvalidItemError(f"{source}:{number}: item end without an item")
            stack.pop()
            continue
        if tag == _SEQ_END:
            if not open_seqs:
                raise InvalidItemError(f"{source}:{number}: sequence end without a sequence")
            open_seqs.pop()
            continue
        if vr == "SQ":
            seq = Sequence()
            stack[-1].add(DataElement(tag, "SQ", seq))
            open_seqs.append(seq)
            continue
        if not vr or vr == "NA":
            raise InvalidItemError(f"{source}:{number}: element without a VR")
        value: object = _value(rest)
        if vr in _NUMERIC_VRS and value != "":
            try:
                convert = _NUMERIC_VRS[vr]
                parts = [convert(v) for v in str(value).split("\\")]
            except ValueError:
                raise InvalidItemError(f"{source}:{number}: bad {vr} value") from None
            value = parts if len(parts) > 1 else parts[0]
        elif vr in ("OB", "OW", "UN"):
            raise InvalidItemError(f"{source}:{number}: binary values ({vr}) are not supported")
        elif isinstance(value, str) and "\\" in value and vr not in ("LT", "ST", "UT"):
            value = value.split("\\")
        if tag not in stack[-1]:  # a repeated tag: the first one wins, as in dump2dcm
            stack[-1].add(DataElement(tag, vr, value if value != "" else None))
    if len(stack) != 1:
        raise InvalidItemError(f"{source}: an item is not closed")
    return root


def read_worklist_file(path: Path) -> WorklistItem:
    """Read one worklist file (DICOM ``.wl``/``.dcm``, or a DCMTK dump) as a step.

    Raises
    ------
    InvalidItemError
        If the file cannot be read or parsed, or is not a usable worklist item.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in DUMP_SUFFIXES:
            ds = parse_dump(path.read_text(encoding="latin-1"), source=path.name)
        else:
            ds = pydicom.dcmread(path, force=True)
            ds.remove_private_tags()
            ds.decode()
    except InvalidItemError:
        raise
    except (OSError, InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise InvalidItemError(f"{path.name}: cannot read: {exc}") from exc
    try:
        return item_from_dataset(ds)
    except InvalidItemError as exc:
        raise InvalidItemError([f"{path.name}: {r}" for r in exc.reasons]) from exc


def list_worklist_files(root: Path) -> list[Path]:
    """`root` itself, or the worklist files under it (by suffix), sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in WORKLIST_SUFFIXES
    )


def read_worklist_files(paths: list[Path]) -> list[WorklistItem]:
    """Read every file; all or nothing.

    Raises
    ------
    InvalidItemError
        Listing every bad file, or two files with the same step id; nothing is returned
        then, so an import stores all files or none.
    """
    items: list[WorklistItem] = []
    problems: list[str] = []
    for path in paths:
        try:
            items.append(read_worklist_file(path))
        except InvalidItemError as exc:
            problems.extend(exc.reasons)
    seen: dict[str, int] = {}
    for item in items:
        seen[item.step_id] = seen.get(item.step_id, 0) + 1
    problems.extend(f"step id {s!r} appears {n} times" for s, n in seen.items() if n > 1)
    if problems:
        raise InvalidItemError(problems)
    return items
