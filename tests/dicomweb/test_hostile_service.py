"""Hostile input against the real service (``python -m dicomweb`` in its own process): each
request gets its status, the process stays up with its peak memory (VmHWM) bounded, and a
normal request still answers afterwards.

The bombs are built here with pydicom: an 8x8 RLE image claiming 2^31-1 frames, a JPEG 2000
image whose SIZ marker claims 60000x60000 (the DICOM header says 64x64), a 65535x65535
header with a codestream to match (a few hundred bytes that would decode to 8 GiB). (Native
pixel data too short for its NumberOfFrames is quarantined at ingest; the service's own
check of it is unit-tested in test_pixel_limits.py.)
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import RLELossless, generate_uid

from tests.dicomweb.conftest import land_and_ingest
from tests.processes import dicomweb_process
from tests.servers import free_port
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.settings import load_settings

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
MIB = 1024**2
GROWTH_LIMIT = 100 * MIB  # peak RSS growth allowed for one hostile request


@dataclass(frozen=True)
class Uids:
    study: str
    series: str
    sop: str

    @property
    def path(self) -> str:
        return f"/dicom-web/studies/{self.study}/series/{self.series}/instances/{self.sop}"


def _part10(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _uids(ds: pydicom.Dataset) -> Uids:
    return Uids(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def _fresh(ds: pydicom.Dataset, study: str) -> pydicom.Dataset:
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _patched_siz(codestream: bytes, width: int, height: int) -> bytes:
    """A J2K codestream whose SIZ marker claims `width` x `height` (ITU T.800 A.5.1)."""
    assert codestream[:4] == b"\xff\x4f\xff\x51"
    return codestream[:8] + struct.pack(">II", width, height) + codestream[16:]


def build_bombs(data_dir: Path) -> dict[str, Uids]:
    settings = load_settings(data_dir=data_dir)
    study = generate_uid()
    made: dict[str, pydicom.Dataset] = {}

    normal = make_instance("CT", study_uid=study, rows=64, columns=64)
    made["normal"] = normal

    rle = make_instance("CT", study_uid=study, rows=8, columns=8)
    rle.compress(RLELossless, generate_instance_uid=False)
    rle.NumberOfFrames = 2**31 - 1
    made["rle_frames"] = rle

    j2k = _fresh(pydicom.dcmread(TEST_FILES / "MR_small_jp2klossless.dcm"), study)
    made["j2k_normal"] = pydicom.dcmread(TEST_FILES / "MR_small_jp2klossless.dcm")
    _fresh(made["j2k_normal"], study)
    (frame,) = generate_frames(j2k.PixelData, number_of_frames=1)
    j2k.PixelData = encapsulate([_patched_siz(frame, 60000, 60000)])
    made["j2k_siz"] = j2k

    huge = _fresh(pydicom.dcmread(TEST_FILES / "MR_small_jp2klossless.dcm"), study)
    huge.Rows = huge.Columns = 65535
    (frame,) = generate_frames(huge.PixelData, number_of_frames=1)
    huge.PixelData = encapsulate([_patched_siz(frame, 65535, 65535)])
    made["j2k_header"] = huge

    blobs = [
        (str(ds.SOPInstanceUID), to_part10(ds) if name == "normal" else _part10(ds))
        for name, ds in made.items()
    ]
    land_and_ingest(settings, blobs)
    return {name: _uids(ds) for name, ds in made.items()}


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    port: int
    uids: dict[str, Uids]
    log: Path

    def status(self) -> dict[str, int]:
        """VmRSS and VmHWM of the service process, in bytes."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
        return values

    def reset_peak(self) -> None:
        """Reset VmHWM to the current RSS (Linux 4.0+: write 5 to clear_refs)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def assert_alive_and_answering(self) -> None:
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        status, _, body = self.request("GET", "/dicom-web/studies")
        assert status == 200, body[:300]
        normal = self.uids["normal"]
        status, headers, body = self.request("GET", normal.path + "/thumbnail")
        assert status == 200 and headers["content-type"] == "image/jpeg", body[:300]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data_dir = tmp_path_factory.mktemp("hostile") / "data"
    uids = build_bombs(data_dir)
    port = free_port()
    log = data_dir.parent / "dicomweb.log"
    env = {
        **os.environ,
        "VANNAH_DATA_DIR": str(data_dir),
        "VANNAH_DICOMWEB_PORT": str(port),
        "VANNAH_FREE_SPACE_RESERVE_MB": "0",
    }
    with dicomweb_process(env, port, log) as process:
        service = Service(process, port, uids, log)
        # Warm up every decode path once, so lazy imports and caches are in the baseline.
        service.assert_alive_and_answering()
        j2k = uids["j2k_normal"]
        for path in ("/thumbnail", "/frames/1", "/rendered"):
            status, _, body = service.request("GET", j2k.path + path)
            assert status == 200, (path, body[:300])
        status, _, _ = service.request("GET", j2k.path, headers={"Accept": "application/dicom"})
        assert status == 200
        yield service


def _reason(body: bytes) -> str:
    return str(json.loads(body)["00000902"]["Value"][0])


def _hostile(service: Service, method: str, path: str, **kwargs: object) -> tuple[int, bytes]:
    """Send one hostile request; check the process stayed up with bounded peak memory."""
    service.reset_peak()
    before = service.status()
    status, _headers, body = service.request(method, path, **kwargs)  # type: ignore[arg-type]
    after = service.status()
    growth = after["VmHWM"] - before["VmRSS"]
    print(f"{method} {path[-60:]}: {status}, VmHWM growth {growth / MIB:.1f} MiB")
    assert growth < GROWTH_LIMIT, f"peak RSS grew {growth / MIB:.0f} MiB"
    service.assert_alive_and_answering()
    return status, body


# --- rendering and decoding bombs ---------------------------------------------------------

OCTETS = {"Accept": 'multipart/related; type="application/octet-stream"'}
EXPLICIT_LE = {
    "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
}


@pytest.mark.parametrize(
    ("bomb", "suffix", "headers"),
    [
        ("rle_frames", "/bulk/7FE00010", OCTETS),
        ("rle_frames", "/frames/1", OCTETS),
        ("rle_frames", "/rendered", {}),
        ("rle_frames", "/thumbnail", {}),
        ("rle_frames", "", EXPLICIT_LE),
        ("rle_frames", "/frames/2147483647", OCTETS),
        ("j2k_siz", "/thumbnail", {}),
        ("j2k_siz", "/frames/1", OCTETS),
        ("j2k_siz", "", EXPLICIT_LE),
        ("j2k_header", "/thumbnail", {}),
        ("j2k_header", "/rendered", {}),
        ("j2k_header", "/frames/1", OCTETS),
        ("j2k_header", "", EXPLICIT_LE),
    ],
)
def test_decode_bombs_are_refused_before_decoding(
    service: Service, bomb: str, suffix: str, headers: dict[str, str]
) -> None:
    path = service.uids[bomb].path + suffix
    status, body = _hostile(service, "GET", path, headers=headers)
    assert status == 400, body[:300]
    reason = _reason(body)
    assert "NumberOfFrames" in reason or "codestream" in reason or "at most" in reason, reason


def test_wado_uri_render_of_a_bomb_is_refused(service: Service) -> None:
    bomb = service.uids["j2k_header"]
    query = f"requestType=WADO&studyUID={bomb.study}&seriesUID={bomb.series}&objectUID={bomb.sop}"
    status, body = _hostile(service, "GET", f"/dicom-web/wado?{query}")
    assert status == 400, body[:300]


def test_frame_lists_are_deduplicated_and_capped(service: Service) -> None:
    normal = service.uids["normal"]
    status, body = _hostile(
        service, "GET", normal.path + "/frames/" + ",".join(["1"] * 3000), headers=OCTETS
    )
    assert status == 200  # one frame, once
    assert body.count(b"Content-Type: application/octet-stream") == 1
    many = ",".join(str(n) for n in range(1, 1002))
    status, body = _hostile(service, "GET", normal.path + f"/frames/{many}", headers=OCTETS)
    assert status == 400 and "at most 1000 frames" in _reason(body)


# --- bodies, part counts and query numbers --------------------------------------------------


def test_stow_with_too_many_empty_parts_is_refused(service: Service) -> None:
    body = b"--b\r\n\r\n\r\n" * 200_000 + b"--b--\r\n"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    status, answer = _hostile(service, "POST", "/dicom-web/studies", body=body, headers=headers)
    assert status == 413, answer[:300]
    assert "more than 10000 parts" in _reason(answer)


def test_stow_of_many_empty_parts_under_the_cap_answers_in_proportion(service: Service) -> None:
    body = b"--b\r\n\r\n\r\n" * 10_000 + b"--b--\r\n"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    service.reset_peak()
    status, answer_headers, answer = service.request(
        "POST", "/dicom-web/studies", body=body, headers=headers
    )
    assert status == 409
    failed = json.loads(answer)["00081198"]["Value"]
    assert len(failed) == 100 and len(answer) < len(body) / 4
    assert "9900 more failed parts" in answer_headers["warning"]
    service.assert_alive_and_answering()


def _raw(port: int, head: bytes, chunks: list[bytes]) -> bytes:
    """Send a request head and body chunks over a raw socket; return the response head."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before the whole body arrived: what we want
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer


def test_worklist_body_over_the_limit_is_refused_by_content_length(service: Service) -> None:
    service.reset_peak()
    head = (
        b"POST /dicom-web/worklist/items HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n"
    )
    answer = _raw(service.port, head, [b"{" * 65536])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert service.status()["VmHWM"] - service.status()["VmRSS"] < GROWTH_LIMIT
    service.assert_alive_and_answering()


def test_worklist_chunked_body_over_the_limit_is_refused_while_streaming(
    service: Service,
) -> None:
    service.reset_peak()
    before = service.status()["VmRSS"]
    head = (
        b"POST /dicom-web/worklist/items HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    answer = _raw(service.port, head, [chunk] * 64)  # 4 MiB: over the 1 MiB limit
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert service.status()["VmHWM"] - before < GROWTH_LIMIT
    service.assert_alive_and_answering()


@pytest.mark.parametrize(
    "query",
    [
        "offset=9223372036854775808",
        "offset=1000000001",
        "limit=99999999999999999999999",
        "offset=-1",
    ],
)
def test_qido_out_of_range_numbers_are_400(service: Service, query: str) -> None:
    status, body = _hostile(service, "GET", f"/dicom-web/studies?{query}")
    assert status == 400, body[:300]
