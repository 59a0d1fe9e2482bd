"""Fixtures for the receiver tests (helpers live in receiver_support.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from receiver_support import ReceiverProcess, free_port


@pytest.fixture
def receiver_process(tmp_path: Path) -> Iterator[Callable[..., ReceiverProcess]]:
    """Factory: start a receiver subprocess on ``tmp_path/data``; stopped at teardown."""
    started: list[ReceiverProcess] = []

    def start(**kwargs: object) -> ReceiverProcess:
        rx = ReceiverProcess(data_dir=tmp_path / "data", **kwargs)  # type: ignore[arg-type]
        started.append(rx.start())
        return rx

    yield start
    for rx in started:
        if rx.proc is not None and rx.proc.poll() is None:
            rx.stop()


@pytest.fixture(scope="module")
def shared_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReceiverProcess]:
    """One receiver (2 workers) for the tests that only add instances with fresh UIDs."""
    root = tmp_path_factory.mktemp("shared-receiver")
    rx = ReceiverProcess(data_dir=root / "data", port=free_port(), workers=2).start()
    yield rx
    if rx.proc is not None and rx.proc.poll() is None:
        rx.stop()
