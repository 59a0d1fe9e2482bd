"""Fixtures for the receiver tests (helpers live in receiver_support.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from receiver_support import ReceiverProcess, Worker, free_port

import receiver.app as app
from receiver.app import build_ae, build_server
from receiver.archive import Archive
from receiver.handlers import AssociationLog, Landing
from vannah_pipelines.security.audit import AuditLog
from vannah_pipelines.settings import load_settings


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


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Factory: a worker's association server in this process on 127.0.0.1:0, as the worker
    builds it, with its own data folder; the fast path is on for ``name="fast"`` (unless
    `overrides` say otherwise). Stopped at teardown."""
    stops: list[Callable[[], None]] = []

    def start(name: str = "fast", data_dir: Path | None = None, **overrides: object) -> Worker:
        values: dict[str, object] = {
            "receiver_fast_store": name == "fast",
            "landing_batch_max_age_seconds": 0.2,
            **overrides,
        }
        settings = load_settings(
            data_dir=data_dir or tmp_path / name / "data", dicom_port=0, **values
        )
        landing = Landing.from_settings(settings)
        archive = Archive(settings)
        ae = build_ae(settings)
        associations = AssociationLog(AuditLog(settings.audit_dir, "receiver"))
        server = build_server(ae, settings, ("127.0.0.1", 0), landing, associations, archive)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()

        def stop() -> None:
            server.shutdown()
            # Teardown, not behaviour (test_fast_store times a drain itself): what a test
            # left running, such as a closed silent connection pynetdicom still holds, is
            # aborted after 0.5 s instead of the worker's 5 s.
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(app, "DRAIN_SECONDS", 0.5)
                app._drain(server)
            landing.close()
            archive.close()

        stops.append(stop)
        return Worker(server, int(server.server_address[1]), settings.data_dir)

    yield start
    for stop in stops:
        stop()
