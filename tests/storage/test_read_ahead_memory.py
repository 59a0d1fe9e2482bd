"""A whole study streamed from the warm tier to a slow client costs the service a bounded
amount of memory, whatever the study's size: the read-ahead holds at most READ_AHEAD (4)
objects beyond the one being sent (each at most ``storage_spool_memory_mb`` in memory).

Measured on the real service (``python -m dicomweb`` in its own process, the warm tier on
SeaweedFS through the minio SDK) by its peak RSS (VmHWM, reset before the request), with
a client that reads slowly so the answer is held back by TCP, as a viewer on a slow link
does. If read-ahead ran unbounded, the service would hold the whole 128 MB study.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.conftest import object_tier_settings
from tests.dicomweb.conftest import land_and_ingest
from tests.processes import dicomweb_process
from tests.servers import S3Server, free_port
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.settings import load_settings
from vannah_pipelines.storage.lifecycle import run_lifecycle

pytestmark = pytest.mark.integration

MIB = 1024**2
INSTANCES = 32
SIDE = 1448  # 1448 x 1448 x 16 bit: 4 MiB of pixel data per instance
SPOOL_MB = 8  # each object fits: read in one go into memory


def _memory(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _get(port: int, path: str, *, slow: bool) -> tuple[int, int]:
    """GET `path` over a raw socket with a small receive buffer; return (status, bytes).
    When `slow`, read 256 KiB at a time with a pause, so the service is held back."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(120)
        sock.connect(("127.0.0.1", port))
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        received = bytearray()
        while chunk := sock.recv(256 * 1024):
            received += chunk
            if slow:
                time.sleep(0.01)
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return int(head.split()[1]), len(body)


@pytest.fixture(scope="module")
def warm_service(
    tmp_path_factory: pytest.TempPathFactory, seaweedfs: S3Server, moto_s3: S3Server
) -> Iterator[tuple[subprocess.Popen[bytes], int, str]]:
    root = tmp_path_factory.mktemp("read-ahead")
    tier_settings = object_tier_settings(seaweedfs, moto_s3)
    settings = load_settings(data_dir=root / "data", **tier_settings)  # type: ignore[arg-type]
    study, series = generate_uid(), generate_uid()
    blobs = []
    for number in range(1, INSTANCES + 1):
        ds = make_instance(
            "CT",
            study_uid=study,
            series_uid=series,
            instance_number=number,
            rows=SIDE,
            columns=SIDE,
            seed=number,
        )
        blobs.append((str(ds.SOPInstanceUID), to_part10(ds)))
    land_and_ingest(settings, blobs)
    result = run_lifecycle(
        settings,
        as_of=datetime.now(UTC) + timedelta(days=40),
        changed_by="test",
        sleep=lambda _seconds: None,  # no reader holds the hot paths: no grace needed
    )
    assert not result.failed and len(result.moves) == 1, result
    assert not list(settings.hot_dir.rglob("*.dcm")), "the study is still hot"
    port = free_port()
    env = {
        **os.environ,
        **{
            f"VANNAH_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in tier_settings.items()
        },
        "VANNAH_DATA_DIR": str(settings.data_dir),
        "VANNAH_DICOMWEB_PORT": str(port),
        "VANNAH_STORAGE_SPOOL_MEMORY_MB": str(SPOOL_MB),
        "VANNAH_FREE_SPACE_RESERVE_MB": "0",
    }
    with dicomweb_process(env, port, root / "dicomweb.log") as process:
        yield process, port, study


def test_warm_study_to_a_slow_client_holds_a_bounded_read_ahead(
    warm_service: tuple[subprocess.Popen[bytes], int, str],
) -> None:
    process, port, study = warm_service
    path = f"/dicom-web/studies/{study}"
    # Warm-up on one instance (imports, pools, connections), not the study: what the
    # study read holds must show in the peak below, not hide in the baseline.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}/instances?limit=1") as answer:
        (first,) = json.load(answer)
    series, sop = first["0020000E"]["Value"][0], first["00080018"]["Value"][0]
    status, one = _get(port, f"{path}/series/{series}/instances/{sop}", slow=False)
    assert status == 200 and one > SIDE * SIDE * 2, (status, one)
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _memory(process.pid)["VmRSS"]
    status, size = _get(port, path, slow=True)
    growth = _memory(process.pid)["VmHWM"] - before
    print(f"study {size / MIB:.0f} MiB to a slow client: peak RSS growth {growth / MIB:.1f} MiB")
    assert status == 200 and size > INSTANCES * SIDE * SIDE * 2, (status, size)
    # The object being sent and READ_AHEAD (4) more, 4 MiB each (measured ~37 MiB with copies
    # in flight and buffers), never the study: unbounded, this read grew it by ~130 MiB.
    assert growth < 64 * MIB, f"{growth / MIB:.0f} MiB"
    assert process.poll() is None
