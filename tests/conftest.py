"""Suite-wide set-up: the tests' own pynetdicom SCUs get the same reactor-race fix as the
receiver (receiver/pynetdicom_fixes.py); without it a loaded machine loses responses."""

from pathlib import Path

from receiver import pynetdicom_fixes

pynetdicom_fixes.install()


import pytest  # noqa: E402  (after the fix above, which must come first)

from vannah_pipelines.landing import layout  # noqa: E402


@pytest.fixture
def synced_dirs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every folder fsynced through ``landing.layout.fsync_dir`` during the test, in order
    (the real fsync still runs)."""
    synced: list[Path] = []
    real = layout.fsync_dir

    def spy(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(layout, "fsync_dir", spy)
    return synced
