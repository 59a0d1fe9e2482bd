"""The outbound C-STORE sender and C-ECHO against real DCMTK ``storescp`` processes: stored
bytes untouched when the peer accepts the stored syntax, decompressed when it takes only
uncompressed ones, per-instance failures that do not stop the others."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from tests.servers import StoreSCP, free_port, storescp_server
from vannah_pipelines.dicom.transcoding import EXPLICIT_LE, IMPLICIT_LE
from vannah_pipelines.dimse.outbound import OutboundInstance, echo, send_instances
from vannah_pipelines.dimse.peers import DicomPeer
from vannah_pipelines.dimse.store_scu import data_set_offset

RLE = "1.2.840.10008.1.2.5"
FILES = ("CT_small.dcm", "SC_rgb_rle.dcm", "JPEG2000.dcm")


def _path(name: str) -> Path:
    found = get_testdata_file(name)
    assert found is not None, name
    return Path(str(found))


def _instance(path: Path, *, as_bytes: bool = True) -> OutboundInstance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)

    def opener() -> BinaryIO:
        return path.open("rb")

    return OutboundInstance(
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        str(ds.file_meta.TransferSyntaxUID),
        path.read_bytes() if as_bytes else opener,
    )


def _data_set(path: Path) -> bytes:
    with path.open("rb") as fp:
        return fp.read()[data_set_offset(fp) :]


def _peer(scp: StoreSCP) -> DicomPeer:
    return DicomPeer(scp.aet, "127.0.0.1", scp.port)


@pytest.fixture
def accept_all(tmp_path: Path) -> Iterator[StoreSCP]:
    with storescp_server(tmp_path / "all", "ALLSCP", ("+xa",)) as scp:
        yield scp


@pytest.fixture
def uncompressed_only(tmp_path: Path) -> Iterator[StoreSCP]:
    with storescp_server(tmp_path / "plain", "PLAINSCP", ()) as scp:
        yield scp


def test_send_instances_sends_the_stored_bytes_to_a_peer_accepting_them(
    accept_all: StoreSCP,
) -> None:
    paths = [_path(name) for name in FILES]
    instances = [_instance(p, as_bytes=i % 2 == 0) for i, p in enumerate(paths)]
    results = send_instances(_peer(accept_all), instances, calling_aet="VANNAH")
    assert [r.sop_instance_uid for r in results] == [i.sop_instance_uid for i in instances]
    assert all(r.ok and r.status == 0 for r in results), results
    received = accept_all.received()
    for path, instance, result in zip(paths, instances, results, strict=True):
        assert result.transfer_syntax_uid == instance.transfer_syntax_uid
        copy = received[instance.sop_instance_uid]
        assert str(pydicom.dcmread(copy).file_meta.TransferSyntaxUID) == (
            instance.transfer_syntax_uid
        )
        assert _data_set(copy) == _data_set(path)  # byte for byte


@pytest.mark.parametrize(("options", "expected"), [((), EXPLICIT_LE), (("+xi",), IMPLICIT_LE)])
def test_send_instances_decompresses_for_a_peer_taking_uncompressed_only(
    tmp_path: Path, options: tuple[str, ...], expected: str
) -> None:
    paths = [_path("SC_rgb_rle.dcm"), _path("JPEG2000.dcm"), _path("CT_small.dcm")]
    with storescp_server(tmp_path / "out", "PLAINSCP", options) as scp:
        results = send_instances(_peer(scp), [_instance(p) for p in paths], calling_aet="VANNAH")
        received = scp.received()
    assert all(r.ok for r in results), results
    assert {r.transfer_syntax_uid for r in results[:2]} == {expected}
    for path in paths:
        original = pydicom.dcmread(path)
        copy = pydicom.dcmread(received[str(original.SOPInstanceUID)])
        assert str(copy.file_meta.TransferSyntaxUID) in (expected, EXPLICIT_LE)
        assert copy.SOPInstanceUID == original.SOPInstanceUID
        assert copy.StudyInstanceUID == original.StudyInstanceUID
        np.testing.assert_array_equal(copy.pixel_array, original.pixel_array)


def _corrupt_rle() -> bytes:
    """SC_rgb_rle.dcm with its RLE segments replaced by garbage (header intact)."""
    ds = pydicom.dcmread(_path("SC_rgb_rle.dcm"))
    ds.PixelData = encapsulate([b"\x03\x00\x00\x00" + b"\xff" * 60])
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_send_instances_fails_one_instance_that_cannot_be_decompressed(
    uncompressed_only: StoreSCP,
) -> None:
    ct = _instance(_path("CT_small.dcm"))
    rle = _instance(_path("SC_rgb_rle.dcm"))
    broken = OutboundInstance(rle.sop_class_uid, "1.2.3.4.5", RLE, _corrupt_rle())

    def unreadable() -> BinaryIO:
        raise OSError("tier down")

    missing = OutboundInstance(ct.sop_class_uid, "1.2.3.4.6", EXPLICIT_LE, unreadable)
    results = send_instances(_peer(uncompressed_only), [broken, missing, ct], calling_aet="VANNAH")
    assert [r.status for r in results] == [None, None, 0]
    assert "decompression of 1.2.840.10008.1.2.5 failed" in results[0].reason
    assert "cannot read" in results[1].reason and "tier down" in results[1].reason
    # Sending the broken one again cannot help; reading the missing one later may.
    assert [r.permanent for r in results] == [True, False, False]
    assert set(uncompressed_only.received()) == {ct.sop_instance_uid}


def test_send_instances_to_a_closed_port_fails_every_instance(tmp_path: Path) -> None:
    peer = DicomPeer("NOBODY", "127.0.0.1", free_port())
    instances = [_instance(_path("CT_small.dcm")), _instance(_path("SC_rgb_rle.dcm"))]
    results = send_instances(peer, instances, calling_aet="VANNAH", timeout=5)
    assert [r.status for r in results] == [None, None]
    assert all("cannot connect" in r.reason for r in results)


def test_echo_answers_success_from_storescp(accept_all: StoreSCP) -> None:
    result = echo(_peer(accept_all), "VANNAH")
    assert result.ok and result.status == 0 and result.reason == ""
    assert result.latency_ms > 0


def test_echo_to_a_closed_port_says_why(tmp_path: Path) -> None:
    result = echo(DicomPeer("NOBODY", "127.0.0.1", free_port()), "VANNAH", timeout=5)
    assert not result.ok and result.status is None
    assert "cannot connect" in result.reason and "refused" in result.reason.lower()
