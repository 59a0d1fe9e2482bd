"""DCMTK's sample worklists and queries: our SCP answers what DCMTK's wlmscpfs answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.worklist.conftest import WLISTDB, WLISTQRY, findscu, needs_dcmtk
from vannah_pipelines.worklist.files import list_worklist_files, read_worklist_files
from vannah_pipelines.worklist.store import WorklistStore

pytestmark = [needs_dcmtk, pytest.mark.integration]

_IGNORED = {"SpecificCharacterSet", "", "ScheduledProcedureStepStatus"}
QUERIES = sorted(p.stem for p in WLISTQRY.glob("*.dump"))


def normalise(ds: pydicom.Dataset) -> dict[str, Any]:
    """Keyword -> value with empty values and the character set left out (wlmscpfs returns
    every attribute it supports, present or not, as empty)."""
    out: dict[str, Any] = {}
    for elem in ds:
        # wlmscpfs returns the status the file holds (none); we return the step's status.
        if elem.keyword in _IGNORED or elem.tag.group in (0, 2):
            continue
        if elem.VR == "SQ":
            items = [normalise(i) for i in elem.value]
            items = [i for i in items if i]
            if items:
                out[elem.keyword] = items
        elif elem.value not in (None, "", b""):
            value = elem.value
            out[elem.keyword] = (
                "\\".join(str(v).strip() for v in value) if elem.VM > 1 else str(value).strip()
            )
    return out


def answers(responses: list[pydicom.Dataset]) -> list[str]:
    return sorted(repr(sorted(normalise(r).items())) for r in responses)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> WorklistStore:
    store = WorklistStore(tmp_path_factory.mktemp("wl") / "data" / "catalog" / "worklist")
    # The dump text itself (pure-Python parser), not the dump2dcm output.
    store.upsert(read_worklist_files(list_worklist_files(WLISTDB)), "import")
    return store


def test_dcmtk_dumps_import_as_ten_steps(imported: WorklistStore) -> None:
    assert len(imported.items()) == 10


def test_dcmtk_wl_files_read_like_their_dumps(dcmtk_files: tuple[Path, Path]) -> None:
    db, _ = dcmtk_files
    from_wl = read_worklist_files(list_worklist_files(db))
    from_dump = read_worklist_files(list_worklist_files(WLISTDB))
    assert {i.step_id: answers([i.dataset]) for i in from_wl} == {
        i.step_id: answers([i.dataset]) for i in from_dump
    }


@pytest.mark.parametrize("name", QUERIES)
def test_dcmtk_query_answers_match_wlmscpfs(
    name: str,
    imported: WorklistStore,
    dcmtk_files: tuple[Path, Path],
    wlmscpfs: int,
    mwl_scp: Any,
    tmp_path: Path,
) -> None:
    _, queries = dcmtk_files
    query = queries / f"{name}.dcm"
    expected, ref = findscu(wlmscpfs, tmp_path / "ref", query=query, aec="OFFIS")
    assert ref.returncode == 0, ref.stderr[-2000:]
    # The samples are from 1995-96: past-due hiding off for the comparison.
    port = mwl_scp(imported, past_due_hours=0)
    got, ours = findscu(port, tmp_path / "ours", query=query)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert answers(got) == answers(expected)
