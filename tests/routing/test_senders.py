"""The destination senders without a remote peer: the folder sender, coercion of the copy
sent, STOW-RS answers read per instance, the factory, and destinations that are down."""

from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pytest

from tests.routing.senders_data import RLE, outgoing, study_files
from tests.servers import free_port
from vannah_pipelines.dimse.outbound import SendResult
from vannah_pipelines.dimse.route_sender import DicomSender, delivered
from vannah_pipelines.routing.rules import (
    Coercion,
    DicomDestination,
    FolderDestination,
    S3Destination,
    StowDestination,
)
from vannah_pipelines.routing.senders import (
    ALREADY_THERE,
    Delivered,
    DestinationError,
    FolderSender,
    Outgoing,
    S3Sender,
    StowSender,
    build_sender,
    coerced,
    stow_requests,
    stow_results,
)

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def _folder(tmp_path: Path) -> FolderDestination:
    return FolderDestination(type="folder", path=str(tmp_path / "out"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- folder


def test_folder_sender_writes_identical_bytes_in_the_documented_layout(
    tmp_path: Path, synced_dirs: list[Path]
) -> None:
    blobs = study_files()
    batch = [outgoing(b) for b in blobs]
    sender = FolderSender(_folder(tmp_path))
    results = sender.send(batch)
    assert [r.sop_instance_uid for r in results] == [o.sop_instance_uid for o in batch]
    assert all(r.ok and r.detail == "stored" for r in results), results
    for o, data, result in zip(batch, blobs, results, strict=True):
        path = (
            tmp_path
            / "out"
            / o.study_instance_uid
            / o.series_instance_uid
            / f"{o.sop_instance_uid}.dcm"
        )
        assert path.read_bytes() == data
        assert result.bytes_sent == len(data)
    assert not list((tmp_path / "out").rglob(".tmp-*"))
    study = tmp_path / "out" / batch[0].study_instance_uid
    series = study / batch[0].series_instance_uid
    # Each new folder's entry, and each file's rename, made durable.
    assert {tmp_path, tmp_path / "out", study, series} <= set(synced_dirs)


def test_folder_sender_is_idempotent_and_replaces_a_different_version(tmp_path: Path) -> None:
    data = study_files(1)[-1]
    sender = FolderSender(_folder(tmp_path))
    [first] = sender.send([outgoing(data)])
    [again] = sender.send([outgoing(data)])
    assert first.ok and first.bytes_sent == len(data)
    assert again == Delivered(first.sop_instance_uid, True, ALREADY_THERE, bytes_sent=0)
    ds = pydicom.dcmread(BytesIO(data))
    ds.InstitutionName = "Another version"
    newer = BytesIO()
    ds.save_as(newer, enforce_file_format=True)
    [replaced] = sender.send([outgoing(newer.getvalue())])
    assert replaced.ok and replaced.detail == "stored (replaced a different version)"
    [path] = (tmp_path / "out").rglob("*.dcm")
    assert path.read_bytes() == newer.getvalue()


def test_folder_sender_refuses_a_uid_with_dot_dot_and_sends_the_others(tmp_path: Path) -> None:
    good, evil_source = study_files(2)[-2:]
    evil = outgoing(evil_source, series_instance_uid="../../escaped")
    results = FolderSender(_folder(tmp_path)).send([evil, outgoing(good)])
    assert not results[0].ok and not results[0].transient
    assert "SeriesInstanceUID is not a valid DICOM UID" in results[0].detail
    assert results[1].ok
    assert not (tmp_path / "escaped").exists()
    assert [p.name for p in tmp_path.rglob("*.dcm")] == [f"{outgoing(good).sop_instance_uid}.dcm"]


def test_folder_sender_refuses_bytes_that_do_not_match_the_checksum(tmp_path: Path) -> None:
    data = study_files(1)[-1]
    wrong = Outgoing(**{**outgoing(data).__dict__, "checksum": "0" * 64})
    [result] = FolderSender(_folder(tmp_path)).send([wrong])
    assert not result.ok and "checksum" in result.detail
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no temp file left either


class _FailingMidway(BytesIO):
    """A stored copy whose reads fail after the first MiB (a tier dropping mid-read)."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() > 0:
            raise OSError("connection reset by the warm tier")
        return super().read(size)


def test_folder_sender_read_failing_midway_is_transient_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    data = study_files(1)[-1] + b"\0" * (2 * 1024 * 1024)  # more than one chunk
    streamed = Outgoing(**{**outgoing(data).__dict__, "open": lambda: _FailingMidway(data)})
    [result] = FolderSender(_folder(tmp_path)).send([streamed])
    assert not result.ok and result.transient and "connection reset" in result.detail
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_stored_copy_that_cannot_be_read_is_a_transient_failure(tmp_path: Path) -> None:
    def broken() -> BinaryIO:
        raise OSError("warm tier unreachable")

    data = study_files(1)[-1]
    lost = Outgoing(**{**outgoing(data).__dict__, "open": broken})
    for coercion in (None, Coercion(prefix={"PatientID": "X-"})):
        [result] = FolderSender(_folder(tmp_path), coercion=coercion).send([lost])
        assert not result.ok and result.transient
        assert "warm tier unreachable" in result.detail


# ---------------------------------------------------------------- coercion


def test_coercion_changes_the_copy_sent_never_the_archive_file(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    paths = []
    for i, data in enumerate(study_files(1)):
        paths.append(archive / f"{i}.dcm")
        paths[-1].write_bytes(data)
    before = {p: p.read_bytes() for p in paths}
    coercion = Coercion(prefix={"PatientID": "VHC-"}, set={"InstitutionName": "Partner"})
    sender = FolderSender(_folder(tmp_path), coercion=coercion)
    results = sender.send([outgoing(p) for p in paths])
    assert all(r.ok for r in results), results
    for path, result in zip(paths, results, strict=True):
        assert path.read_bytes() == before[path]  # the archive's object is never changed
        original = pydicom.dcmread(path)
        [sent_path] = (tmp_path / "out").rglob(f"{original.SOPInstanceUID}.dcm")
        sent = pydicom.dcmread(sent_path)
        assert sent.PatientID == f"VHC-{original.PatientID}"
        assert sent.InstitutionName == "Partner"
        assert sent.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert sent.PixelData == original.PixelData  # compressed fragments untouched too
        assert result.bytes_sent == sent_path.stat().st_size
    syntaxes = {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in paths}
    assert RLE in syntaxes


def test_coerced_gives_a_new_checksum_and_size_and_none_is_the_same_object() -> None:
    o = outgoing(study_files(1)[-1])
    assert coerced(o, None) is o
    c = coerced(o, Coercion(prefix={"PatientID": "VHC-"}))
    with c.open() as fp:
        data = fp.read()
    assert (c.checksum, c.size) == (_sha(data), len(data))
    assert c.checksum != o.checksum
    assert c.sop_instance_uid == o.sop_instance_uid


def test_coercion_of_bytes_that_are_not_dicom_is_a_permanent_failure(tmp_path: Path) -> None:
    junk = b"not dicom at all" * 10
    o = Outgoing("1.2", "1.2.3", "1.2.3.4", CT_CLASS, "1.2.840.10008.1.2.1", _sha(junk),
                 len(junk), lambda: BytesIO(junk))  # fmt: skip
    [result] = FolderSender(_folder(tmp_path), coercion=Coercion(remove=["PatientID"])).send([o])
    assert not result.ok and not result.transient
    assert result.detail.startswith("cannot coerce")


# ---------------------------------------------------------------- STOW-RS answers


def _o(uid: str, size: int = 10) -> Outgoing:
    return Outgoing("1.2", "1.2.3", uid, CT_CLASS, "1.2.840.10008.1.2.1", "00", size,
                    lambda: BytesIO())  # fmt: skip


def _seq(tag: str, *items: tuple[str, int | None]) -> dict[str, Any]:
    values = []
    for uid, code in items:
        item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if code is not None:
            item["00081197" if tag == "00081198" else "00081196"] = {"vr": "US", "Value": [code]}
        values.append(item)
    return {tag: {"vr": "SQ", "Value": values}}


def test_stow_results_read_each_instance_of_a_partial_answer() -> None:
    sent = [_o("1.1"), _o("1.2"), _o("1.3"), _o("1.4")]
    body = {
        **_seq("00081199", ("1.1", None), ("1.4", 0xB000)),
        **_seq("00081198", ("1.2", 0xA700), ("1.3", 0xC000)),
    }
    a, b, c, d = stow_results(202, body, sent)
    assert (a.ok, a.detail, a.bytes_sent) == (True, "stored (STOW-RS 202)", 10)
    assert (b.ok, b.transient) == (False, True) and "0xA700" in b.detail
    assert (c.ok, c.transient) == (False, False) and "0xC000" in c.detail
    assert d.ok and d.detail == "stored (STOW-RS 202), warning 0xB000"
    [missing] = stow_results(202, _seq("00081199", ("1.1", None)), [_o("9.9")])
    assert (missing.ok, missing.transient) == (False, True)
    assert all(r.ok for r in stow_results(200, None, sent))
    [refused] = stow_results(409, _seq("00081198", ("1.1", 0xA900)), [_o("1.1")])
    assert (refused.ok, refused.transient) == (False, False)


@pytest.mark.parametrize(
    ("status", "transient"),
    [(401, False), (403, False), (400, False), (404, False), (413, False), (408, True),
     (429, True), (500, True), (503, True)],
)  # fmt: skip
def test_stow_results_of_a_refused_request_fail_every_instance(
    status: int, transient: bool
) -> None:
    results = stow_results(status, None, [_o("1.1"), _o("1.2")], "why")
    assert [(r.ok, r.transient) for r in results] == [(False, transient)] * 2
    assert results[0].detail == f"STOW-RS {status}: why"


def test_stow_requests_are_cut_by_count_and_bytes() -> None:
    batch = [_o(f"1.{i}", size) for i, size in enumerate([10, 10, 10, 100, 10])]
    sizes = [[o.size for o in chunk] for chunk in stow_requests(batch, 2, 50)]
    assert sizes == [[10, 10], [10], [100], [10]]


# ---------------------------------------------------------------- the factory


def test_build_sender_gives_each_destination_its_sender(tmp_path: Path) -> None:
    secrets = {"key": "AK:SK", "tok": "t0k"}
    s3 = S3Destination(type="s3", bucket="vhc-archive", region="af-south-1", credentials="key")
    stow = StowDestination(type="stow", url="http://127.0.0.1:1/dicom-web", token="tok")
    ae = DicomDestination(aet="AI", host="127.0.0.1", port=104)
    built = [
        build_sender(d, secrets=secrets, calling_aet="VANNAH", dicom=DicomSender)
        for d in (_folder(tmp_path), s3, stow, ae)
    ]
    assert [type(s) for s in built] == [FolderSender, S3Sender, StowSender, DicomSender]
    assert built[2].headers["Authorization"] == "Bearer t0k"  # type: ignore[attr-defined]
    for sender in built:
        sender.close()


def test_build_sender_refuses_what_cannot_be_sent_to(tmp_path: Path) -> None:
    ae = DicomDestination(aet="AI", host="127.0.0.1", port=104)
    with pytest.raises(DestinationError, match="no DICOM sender given"):
        build_sender(ae, secrets={}, calling_aet="VANNAH")
    s3 = S3Destination(type="s3", bucket="vhc-archive", credentials="key")
    with pytest.raises(DestinationError, match="no secret 'key'"):
        build_sender(s3, secrets={}, calling_aet="VANNAH")
    with pytest.raises(DestinationError, match="ACCESS_KEY_ID:SECRET_ACCESS_KEY"):
        build_sender(s3, secrets={"key": "no-colon"}, calling_aet="VANNAH")
    stow = StowDestination(type="stow", url="http://h/dicom-web", apiKey="k")
    with pytest.raises(DestinationError, match="no secret 'k'"):
        build_sender(stow, secrets={}, calling_aet="VANNAH")
    tls = DicomDestination(aet="AI", host="127.0.0.1", port=104, useDicomTls=True)
    with pytest.raises(DestinationError, match="DICOM TLS"):
        build_sender(tls, secrets={}, calling_aet="VANNAH", dicom=DicomSender)


# ---------------------------------------------------------------- DIMSE results


def test_c_store_statuses_map_to_delivered() -> None:
    assert delivered(SendResult("1.1", 0x0000, "", "1.2.840.10008.1.2.1"), 5) == Delivered(
        "1.1", True, "C-STORE 0x0000", bytes_sent=5
    )
    assert delivered(SendResult("1.1", 0xB007, "coerced"), 5).ok
    out_of_resources = delivered(SendResult("1.1", 0xA701, "disk full"), 5)
    assert (out_of_resources.ok, out_of_resources.transient) == (False, True)
    assert out_of_resources.detail == "C-STORE 0xA701 disk full"
    for status in (0xA900, 0xC000, 0x0122, 0x0124):
        refused = delivered(SendResult("1.1", status), 5)
        assert (refused.ok, refused.transient) == (False, False)
    down = delivered(SendResult("1.1", None, "cannot connect"), 5)
    assert (down.ok, down.transient) == (False, True)
    never = delivered(SendResult("1.1", None, "peer accepts neither", permanent=True), 5)
    assert (never.ok, never.transient) == (False, False)


# ---------------------------------------------------------------- destinations down


def test_a_destination_that_is_down_fails_each_instance_transiently(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    secrets = {"s3": "AK:SK", "key": "k"}
    destinations = [
        DicomDestination(aet="DOWN", host="127.0.0.1", port=port),
        S3Destination(type="s3", bucket="vhc-down", endpoint=f"http://127.0.0.1:{port}",
                      credentials="s3"),
        StowDestination(type="stow", url=f"http://127.0.0.1:{port}/dicom-web", apiKey="key"),
    ]  # fmt: skip
    batch = [outgoing(b) for b in study_files(1)]
    for destination in destinations:
        sender = build_sender(
            destination, secrets=secrets, calling_aet="VANNAH", timeout=5, dicom=DicomSender
        )
        try:
            results = sender.send(batch)
        finally:
            sender.close()
        assert [r.sop_instance_uid for r in results] == [o.sop_instance_uid for o in batch]
        assert all(not r.ok and r.transient and r.detail for r in results), (destination, results)
        # Tried once, not once per instance: every instance carries the same reason.
        assert len({r.detail for r in results}) == 1, results
