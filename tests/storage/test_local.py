"""Local-folder storage: atomic, durable puts; keys cannot leave the root."""

from pathlib import Path

import pytest

from vannah_pipelines.errors import StorageError
from vannah_pipelines.storage.base import Tier
from vannah_pipelines.storage.local import LocalStorage


def test_put_makes_every_new_folder_level_durable(tmp_path: Path, synced_dirs: list[Path]) -> None:
    synced = synced_dirs
    synced.clear()
    source = tmp_path / "src.dcm"
    source.write_bytes(b"DICM")
    hot = LocalStorage(tmp_path / "hot", Tier.HOT)
    hot.put("1.2/1.2.3/1.2.3.4.abcd.dcm", source, sync=False)
    # the hot root, the study and the series folder are new: each parent is synced
    assert synced == [tmp_path, tmp_path / "hot", tmp_path / "hot" / "1.2"]
    synced.clear()
    hot.put("1.2/1.2.3/1.2.3.5.abcd.dcm", source, sync=False)
    assert synced == []  # no new folder; the caller syncs the series folder per batch
    assert hot.open("1.2/1.2.3/1.2.3.5.abcd.dcm").read() == b"DICM"


@pytest.mark.parametrize("key", ["../x.dcm", "/etc/passwd", "a/../../x", ""])
def test_put_refuses_keys_that_leave_the_root(tmp_path: Path, key: str) -> None:
    source = tmp_path / "src.dcm"
    source.write_bytes(b"x")
    with pytest.raises(StorageError):
        LocalStorage(tmp_path / "hot").put(key, source)
