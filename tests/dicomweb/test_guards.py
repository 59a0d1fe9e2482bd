"""Safe defaults of the DICOMweb service: Host header check, CORS, body limits, STOW-RS
part cap and free-space reserve, ENOSPC while storing, and the pixel budget's pure checks."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames

from dicomweb.app import create_app
from dicomweb.guards import host_name
from dicomweb.rendering import FrameError, parse_frame_list
from vannah_pipelines.dicom.pixel_limits import (
    DecodeBudgetError,
    PixelDataMismatchError,
    PixelHeader,
    check_codestream,
    frames_present,
    require_budget,
)
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.settings import Settings

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b'


def _client(tmp_path: Path, base_url: str = "http://localhost", **settings: Any) -> TestClient:
    return TestClient(
        create_app(Settings(data_dir=tmp_path / "data", **settings)), base_url=base_url
    )


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- Host header ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:8042", "[::1]:8042", "LOCALHOST"])
def test_host_guard_answers_loopback_names_by_default(tmp_path: Path, host: str) -> None:
    response = _client(tmp_path).get("/dicom-web/studies", headers={"Host": host})
    assert response.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8042", "127.0.0.1.evil.example"])
def test_host_guard_refuses_other_names_by_default(tmp_path: Path, host: str) -> None:
    response = _client(tmp_path).get("/dicom-web/studies", headers={"Host": host})
    assert response.status_code == 400
    assert "Host" in response.json()["00000902"]["Value"][0]


def test_host_guard_allows_any_host_with_remote_access(tmp_path: Path) -> None:
    client = _client(tmp_path, remote_access_allowed=True)
    assert client.get("/dicom-web/studies", headers={"Host": "pacs.example"}).status_code == 200


def test_host_guard_takes_configured_names_exactly(tmp_path: Path) -> None:
    client = _client(tmp_path, dicomweb_allowed_hosts=("pacs.example",), remote_access_allowed=True)
    assert client.get("/dicom-web/studies", headers={"Host": "pacs.example:443"}).status_code == 200
    assert client.get("/dicom-web/studies", headers={"Host": "localhost"}).status_code == 400
    assert client.get("/dicom-web/studies", headers={"Host": "evil.example"}).status_code == 400


def test_host_name_rejects_malformed_values() -> None:
    assert host_name("[::1") is None
    assert host_name("a.example:x") is None
    assert host_name("a b") is None
    assert host_name("") is None


# --- CORS -------------------------------------------------------------------------------

PREFLIGHT = {
    "Origin": "https://evil.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


def test_cors_preflight_from_a_foreign_origin_is_refused_by_default(tmp_path: Path) -> None:
    client = _client(tmp_path)
    response = client.options("/dicom-web/studies", headers=PREFLIGHT)
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    simple = client.get("/dicom-web/studies", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_cors_preflight_from_a_configured_origin_is_allowed(tmp_path: Path) -> None:
    client = _client(tmp_path, dicomweb_cors_origins=("https://viewer.example",))
    headers = {**PREFLIGHT, "Origin": "https://viewer.example"}
    response = client.options("/dicom-web/studies", headers=headers)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://viewer.example"
    allowed = {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    assert allowed == {"GET", "POST", "PUT", "DELETE"}
    assert client.options("/dicom-web/studies", headers=PREFLIGHT).status_code == 400


def test_request_with_a_foreign_host_is_refused_before_cors(tmp_path: Path) -> None:
    client = _client(tmp_path, dicomweb_cors_origins=("https://viewer.example",))
    headers = {**PREFLIGHT, "Origin": "https://viewer.example", "Host": "evil.example"}
    assert client.options("/dicom-web/studies", headers=headers).status_code == 400


# --- body limits ------------------------------------------------------------------------


def test_worklist_body_over_the_limit_is_413(tmp_path: Path) -> None:
    client = _client(tmp_path, dicomweb_max_body_bytes=1024)
    response = client.post(
        "/dicom-web/worklist/items",
        content=b"{" + b" " * 2048 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert "exceeds 1024 bytes" in response.json()["00000902"]["Value"][0]


def test_chunked_worklist_body_over_the_limit_is_413(tmp_path: Path) -> None:
    client = _client(tmp_path, dicomweb_max_body_bytes=1024)

    def chunks() -> Any:
        for _ in range(8):
            yield b" " * 512

    response = client.post(
        "/dicom-web/worklist/items", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    put = client.put("/dicom-web/worklist/items/X1", content=chunks())
    assert put.status_code == 413


def test_body_limit_does_not_apply_to_stow(tmp_path: Path) -> None:
    client = _client(tmp_path, dicomweb_max_body_bytes=1024, free_space_reserve_mb=0)
    part = to_part10(make_instance("CT", rows=32, columns=32))
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--b--\r\n"
    assert len(body) > 1024
    response = client.post("/dicom-web/studies", content=body, headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 200, response.text


def test_invalid_content_length_is_400(tmp_path: Path) -> None:
    client = _client(tmp_path)
    response = client.get("/dicom-web/studies", headers={"Content-Length": "12x"})
    assert response.status_code == 400


# --- STOW-RS: parts, reserve, disk full ------------------------------------------------------


def test_stow_parts_over_the_cap_are_413(tmp_path: Path) -> None:
    client = _client(tmp_path, stow_max_parts=5, free_space_reserve_mb=0)
    body = b"--b\r\n\r\n\r\n" * 6 + b"--b--\r\n"
    response = client.post("/dicom-web/studies", content=body, headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 413
    assert "more than 5 parts" in response.json()["00000902"]["Value"][0]
    assert not [p for p in _files(tmp_path / "data" / "landing") if p.suffix == ".dcm"]


def test_stow_over_the_free_space_reserve_is_507_before_writing(tmp_path: Path) -> None:
    client = _client(tmp_path, free_space_reserve_mb=2**40)  # more than any disk
    part = to_part10(make_instance("CT", rows=16, columns=16))
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--b--\r\n"
    response = client.post("/dicom-web/studies", content=body, headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 507
    assert "free disk space" in response.json()["00000902"]["Value"][0]
    assert _files(tmp_path / "data" / "landing") == []


@pytest.mark.parametrize("writes_before_full", [0, 1], ids=["spooling", "committing"])
def test_stow_enospc_while_storing_fails_the_instance_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writes_before_full: int
) -> None:
    client = _client(tmp_path, free_space_reserve_mb=0)
    data = to_part10(make_instance("CT", rows=64, columns=64))
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"
    real_write = os.write
    allowed = [writes_before_full]

    def full_disk(fd: int, buffer: Any) -> int:
        if len(buffer) > 4096:  # the instance's bytes (spool, then landing), not receipts
            if allowed[0] == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            allowed[0] -= 1
        return real_write(fd, buffer)

    monkeypatch.setattr(os, "write", full_disk)
    response = client.post("/dicom-web/studies", content=body, headers={"Content-Type": STOW_TYPE})
    monkeypatch.undo()
    assert response.status_code == 409
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700]
    assert not [p for p in _files(tmp_path / "data" / "landing") if p.suffix == ".dcm"]
    assert not [p for p in _files(tmp_path / "data" / "landing") if ".tmp" in p.name]


# --- frame lists and the pixel budget (pure) ---------------------------------------------


def test_parse_frame_list_deduplicates_and_caps() -> None:
    assert parse_frame_list("2,1,2,1", max_frames=2) == [2, 1]
    with pytest.raises(FrameError, match="at most 2 frames"):
        parse_frame_list("1,2,3", max_frames=2)
    for bad in ("0", "-1", "²", "1" * 11, ""):
        with pytest.raises(FrameError):
            parse_frame_list(bad)


def _native(frames: int, data: bytes) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = 8
    ds.SamplesPerPixel = 1
    ds.NumberOfFrames = frames
    ds.PixelData = data
    return ds


def test_native_frames_must_fit_the_pixel_data() -> None:
    assert frames_present(_native(2, bytes(128))) == 2
    with pytest.raises(PixelDataMismatchError, match="NumberOfFrames 2147483647"):
        frames_present(_native(2**31 - 1, bytes(64)))


def test_encapsulated_frames_must_have_fragments() -> None:
    ds = _native(3, encapsulate([b"\x00" * 10, b"\x00" * 10]))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.5"
    with pytest.raises(PixelDataMismatchError, match="2 fragment"):
        frames_present(ds)
    ds.NumberOfFrames = 2
    assert frames_present(ds) == 2


def test_budget_counts_rows_columns_samples_bytes_and_frames() -> None:
    header = PixelHeader(rows=100, columns=100, samples=3, bits_allocated=12, frames=10)
    assert header.frame_bytes == 100 * 100 * 3 * 2
    require_budget(header, 10, 600_000)
    with pytest.raises(DecodeBudgetError):
        require_budget(header, 11, 600_000)


def test_j2k_siz_larger_than_the_header_is_refused() -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small_jp2klossless.dcm")
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    header = PixelHeader(int(ds.Rows), int(ds.Columns), 1, int(ds.BitsAllocated), 1)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    check_codestream(frame, syntax, header)
    lying = frame[:8] + (60000).to_bytes(4, "big") * 2 + frame[16:]
    with pytest.raises(PixelDataMismatchError, match="60000x60000"):
        check_codestream(lying, syntax, header)


def test_jpeg_sof_larger_than_the_header_is_refused() -> None:
    ds = pydicom.dcmread(TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm")
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    header = PixelHeader(int(ds.Rows), int(ds.Columns), 3, 8, 1)
    check_codestream(frame, syntax, header)
    small = PixelHeader(int(ds.Rows) // 2, int(ds.Columns), 3, 8, 1)
    with pytest.raises(PixelDataMismatchError, match="codestream"):
        check_codestream(frame, syntax, small)


# --- server limits and logs ----------------------------------------------------------------


def test_uvicorn_config_applies_the_limits(tmp_path: Path) -> None:
    from dicomweb.__main__ import MAX_HEADER_BYTES, uvicorn_config

    config = uvicorn_config(
        Settings(
            data_dir=tmp_path / "data",
            dicomweb_max_concurrency=7,
            dicomweb_keep_alive_seconds=3,
            dicomweb_host="127.0.0.2",
        )
    )
    assert (config.host, config.limit_concurrency, config.timeout_keep_alive) == (
        "127.0.0.2",
        7,
        3,
    )
    assert config.http == "h11" and config.h11_max_incomplete_event_size == MAX_HEADER_BYTES
    assert uvicorn_config(Settings(data_dir=tmp_path, remote_access_allowed=True)).host == (
        "0.0.0.0"
    )


def test_logs_carry_no_patient_data_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = _client(tmp_path, free_space_reserve_mb=0)
    good = make_instance("CT", patient_name="Zola^Emile", patient_id="PAT-SECRET-7")
    good.AccessionNumber = "ACC-SECRET-9"
    bad = make_instance("CT", patient_name="Zola^Emile", patient_id="PAT-SECRET-7")
    bad.StudyInstanceUID = "1.2.3/../../etc"
    body = b"".join(
        b"--b\r\nContent-Type: application/dicom\r\n\r\n" + to_part10(ds) + b"\r\n"
        for ds in (good, bad)
    )
    body += b"--b--\r\n"
    with caplog.at_level("INFO"):
        stow = client.post("/dicom-web/studies", content=body, headers={"Content-Type": STOW_TYPE})
        assert stow.status_code == 202, stow.text
        client.get(
            "/dicom-web/studies", params={"PatientName": "Zola*", "PatientID": "PAT-SECRET-7"}
        )
        client.get("/dicom-web/studies", params={"AccessionNumber": "ACC-SECRET-9", "offset": "x"})
    # The service's own records (the test's HTTP client logs its URLs, query and all).
    text = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name.startswith(("dicomweb", "vannah_pipelines", "uvicorn", "starlette"))
    )
    assert "STOW-RS" in text  # something was logged
    for secret in ("Zola", "PAT-SECRET-7", "ACC-SECRET-9", "../"):
        assert secret not in text, secret
