"""The whole chain as `make up` runs it: DCMTK storescu and pynetdicom -> receiver ->
landing -> Dagster daemon sensor -> ingest run -> catalog + hot tier."""

import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode, split_dataset

from receiver.status import StoreStatus
from tests.integration.conftest import Daemon, start_daemon, stop_daemon
from tests.receiver.receiver_support import (
    DCMTK_ENV,
    STORESCU_PROPOSE,
    ReceiverProcess,
    pydicom_files_with_meta,
    storescu_outcomes,
)
from tests.servers import free_port
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.synthetic import MODALITIES, make_instance, to_part10, write_study

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[tuple[ReceiverProcess, Daemon]]:
    data = tmp_path / "data"
    daemon = start_daemon(data)
    rx = ReceiverProcess(data_dir=data, port=free_port(), workers=2).start()
    try:
        yield rx, daemon
    finally:
        if rx.proc is not None and rx.proc.poll() is None:
            rx.stop()
        stop_daemon(daemon)


def _dataset_bytes(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _send_pydicom_files(
    port: int,
) -> tuple[dict[str, list[tuple[str, bytes]]], dict[str, int]]:
    """Send every pydicom test file pynetdicom can send, in order; returns SOP UID -> the
    acked versions as (file name, data set bytes sent), and file name -> status of those
    refused."""
    ae = AE(ae_title="PYNETSCU")
    acked: dict[str, list[tuple[str, bytes]]] = {}
    refused: dict[str, int] = {}
    for path in sorted(TEST_FILES.rglob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                meta, _ = split_dataset(path)
                ds = pydicom.dcmread(path)
            except Exception:
                continue
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            continue
        syntax = UID(str(meta.TransferSyntaxUID))
        ae.requested_contexts = []
        ae.add_requested_context(ds.SOPClassUID, [syntax])
        assoc = ae.associate("127.0.0.1", port, ae_title="VANNAHCLOUD")
        if not assoc.is_established:
            continue
        try:
            status = assoc.send_c_store(ds)
        except (ValueError, AttributeError, TypeError):
            assoc.abort()
            continue
        assoc.release()
        if status.get("Status") == StoreStatus.SUCCESS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sent = encode(
                    ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
                )
                acked.setdefault(str(ds.SOPInstanceUID), []).append((path.name, sent))
        elif "Status" in status:
            refused[path.name] = int(status.Status)
    return acked, refused


def test_storescu_and_pynetdicom_to_catalog_byte_identical(
    platform: tuple[ReceiverProcess, Daemon], tmp_path: Path
) -> None:
    rx, daemon = platform
    echo = subprocess.run(
        ["echoscu", "-aec", "VANNAHCLOUD", "127.0.0.1", str(rx.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echo.returncode == 0, echo.stderr
    synthetic: dict[str, Path] = {}
    for modality in MODALITIES:
        study = write_study(
            tmp_path / "in" / modality,
            modality,
            series=2,
            instances_per_series=2,
            rows=64,
            columns=64,
        )
        synthetic.update({p.stem: p for p in study.files})
    sent = subprocess.run(
        [
            "storescu",
            "-aet",
            "E2ESCU",
            "-aec",
            "VANNAHCLOUD",
            "+sd",
            "+r",
            "127.0.0.1",
            str(rx.port),
            str(tmp_path / "in"),
        ],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sent.returncode == 0, sent.stderr
    versions, refused = _send_pydicom_files(rx.port)
    assert len(versions) >= 30  # distinct SOP Instance UIDs (several files share one)
    # pynetdicom re-encodes what it reads, so a truncated file arrives well-formed. Its
    # value lengths then agree, but MR_truncated.dcm's pixel data stays short of
    # Rows x Columns: the receive-time check refuses it (0xC000), so the sender knows and
    # nothing unreadable is acknowledged. (rtplan_truncated.dcm loses the end of a sequence
    # and is a valid, newer version after re-encoding.) Several files share one SOP
    # Instance UID: the latest version sent is current. The JPEG-LS test files have no
    # Study Instance UID: 0xA900 (PS3.4 B.2.3).
    no_study = ("JPEGLSNearLossless_08", "JPEGLSNearLossless_16", "SC_rgb_jls_lossy_line",
                "SC_rgb_jls_lossy_sample")  # fmt: skip
    assert refused == {"MR_truncated.dcm": 0xC000} | {f"{n}.dcm": 0xA900 for n in no_study}
    pydicom_acked = {u: vs[-1][1] for u, vs in versions.items()}

    sources = {u: next(TEST_FILES.rglob(vs[-1][0])) for u, vs in versions.items()}
    expected = {uid: _dataset_bytes(p) for uid, p in synthetic.items()} | pydicom_acked
    reader = daemon.wait_for_instances(len(expected), timeout=180)
    rows = {
        r[0]: r[1:]
        for r in reader.query(
            "SELECT sop_instance_uid, storage_key, modality, sop_class_uid, study_instance_uid, "
            "series_instance_uid, calling_ae, tier FROM instances"
        )
    }
    assert set(expected) <= set(rows)
    hot = daemon.data_dir / "hot"
    for uid, data in expected.items():
        key, modality, sop_class, study, series, calling_ae, tier = rows[uid]
        assert _dataset_bytes(hot / key) == data, uid  # byte-identical to what was sent
        assert tier == "hot"
        source = pydicom.dcmread(synthetic.get(uid) or sources[uid], stop_before_pixels=True)
        assert (sop_class, study, series) == (
            source.SOPClassUID,
            source.StudyInstanceUID,
            source.SeriesInstanceUID,
        )
        assert calling_ae == ("PYNETSCU" if uid in pydicom_acked else "E2ESCU")
        if uid in synthetic:
            assert modality == source.Modality
            assert sop_class == MODALITIES[modality].sop_class_uid
    # Nothing acknowledged was unreadable: quarantine stays empty.
    reader.refresh()
    assert reader.query("SELECT sop_instance_uid, reason FROM quarantine") == []


def test_storescu_pydicom_test_files_reach_the_catalog(
    platform: tuple[ReceiverProcess, Daemon],
) -> None:
    """Every file of pydicom's set that DCMTK storescu sends and we acknowledge is indexed,
    with the attributes of the file (storescu may re-serialise a file: padding, lengths)."""
    rx, daemon = platform
    by_syntax: dict[str, list[Path]] = {}
    for path, syntax in pydicom_files_with_meta().items():
        if syntax in STORESCU_PROPOSE:
            by_syntax.setdefault(syntax, []).append(path)
    acked: dict[str, Path] = {}
    for syntax, paths in by_syntax.items():
        result = subprocess.run(
            [
                "storescu",
                "-v",
                "-nh",
                "-aet",
                "DCMTKSET",
                *STORESCU_PROPOSE[syntax],
                "127.0.0.1",
                str(rx.port),
                *map(str, paths),
            ],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        outcomes = storescu_outcomes(result.stdout + result.stderr)
        for path in paths:
            if outcomes.get(str(path)) == "success":
                uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                acked[uid] = path  # several files share a UID: the last one sent is current
    assert len(acked) >= 30
    reader = daemon.wait_for_instances(len(acked), timeout=180)
    rows = {
        r[0]: r[1:]
        for r in reader.query(
            "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, "
            "calling_ae, storage_key FROM instances"
        )
    }
    for uid, path in acked.items():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        sop_class, study, series, calling_ae, key = rows[uid]
        assert (sop_class, study, series, calling_ae) == (
            source.SOPClassUID,
            source.StudyInstanceUID,
            source.SeriesInstanceUID,
            "DCMTKSET",
        )
        assert (daemon.data_dir / "hot" / key).is_file()


def _send_many(port: int, ae_title: str, count: int, acked: list[str]) -> None:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.network_timeout = 10
    # pynetdicom does not wake a C-STORE waiting for its answer when the connection dies:
    # after the SIGKILL every sender waits this long (an answer slower than that before it
    # only ends that sender early; the others make the 80 acknowledgements).
    ae.dimse_timeout = 5
    ae.add_requested_context(MODALITIES["CT"].sop_class_uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="VANNAHCLOUD")
    if not assoc.is_established:
        return
    for i in range(count):
        ds = pydicom.dcmread(BytesIO(to_part10(make_instance("CT", rows=32, columns=32, seed=i))))
        try:
            status = assoc.send_c_store(ds)
        except (RuntimeError, ValueError):
            return
        if status.get("Status") == StoreStatus.SUCCESS:
            acked.append(str(ds.SOPInstanceUID))
        elif not assoc.is_established:
            return
    assoc.release()


def test_receiver_sigkill_mid_send_then_restart_every_ack_in_catalog(
    platform: tuple[ReceiverProcess, Daemon],
) -> None:
    rx, daemon = platform
    acked: list[str] = []
    threads = [
        threading.Thread(target=_send_many, args=(rx.port, f"KILL{i}", 150, acked), daemon=True)
        for i in range(4)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(acked) < 80 and time.monotonic() < deadline:
        time.sleep(0.01)
    rx.kill_group()  # SIGKILL the supervisor and every worker, mid-send
    # The restarted receiver (and the sensor) seal what the dead workers left. It starts
    # while the senders still wait for the answers the dead ones never sent (no sender
    # associates again, and only the dead receiver could acknowledge).
    rx.start()
    for t in threads:
        t.join(timeout=60)
    acknowledged = set(acked)
    assert len(acknowledged) >= 80
    reader = daemon.wait_for_instances(len(acknowledged), timeout=180)
    indexed = {r[0] for r in reader.query("SELECT sop_instance_uid FROM instances")}
    assert acknowledged <= indexed
    assert reader.query(
        "SELECT count(*) - count(DISTINCT sop_instance_uid) FROM instance_versions"
    ) == [(0,)]
    for (key,) in reader.query("SELECT storage_key FROM instances"):
        assert (daemon.data_dir / "hot" / key).is_file()
    assert isinstance(reader, CatalogReader)
