"""The receiver as a real ``python -m receiver`` subprocess, against DCMTK and pynetdicom peers."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from receiver_support import (
    DCMTK_ENV,
    STORESCU_PROPOSE,
    ReceiverProcess,
    dataset_bytes_of_file,
    pydicom_files_with_meta,
    sealed_instances,
    storescu_outcomes,
    wait_sealed,
)

from receiver.status import StoreStatus
from vannah_pipelines.dicom.synthetic import MODALITIES, make_instance, to_part10, write_study

pytestmark = pytest.mark.integration

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _store_ok(landed: dict[str, list], uid: str, expected: bytes) -> bool:
    return any(item.dataset_bytes() == expected for item in landed.get(uid, []))


def _same_elements(a: pydicom.Dataset, b: pydicom.Dataset) -> bool:
    # DCMTK may fix odd-length pixel data and drop padding, so only identity is compared.
    keys = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    return all(a.get(k) == b.get(k) for k in keys)


def test_receiver_echoscu_succeeds(shared_receiver: ReceiverProcess) -> None:
    result = subprocess.run(
        [
            "echoscu",
            "-aet",
            "ECHOTEST",
            "-aec",
            "VANNAHCLOUD",
            "127.0.0.1",
            str(shared_receiver.port),
        ],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "association from ECHOTEST" in shared_receiver.log()


def test_receiver_storescu_lands_synthetic_modalities_byte_identical(
    shared_receiver: ReceiverProcess, tmp_path: Path
) -> None:
    sent: dict[str, Path] = {}
    for modality in MODALITIES:
        study = write_study(tmp_path / "in" / modality, modality, instances_per_series=2)
        sent.update({p.stem: p for p in study.files})
    result = subprocess.run(
        [
            "storescu",
            "-aet",
            "SYNTHSCU",
            "+sd",
            "+r",
            "127.0.0.1",
            str(shared_receiver.port),
            str(tmp_path / "in"),
        ],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    landed = wait_sealed(shared_receiver.data_dir, set(sent))
    for uid, path in sent.items():
        (item,) = landed[uid]
        assert item.dataset_bytes() == dataset_bytes_of_file(path), uid
        assert item.receipt is not None
        assert item.receipt["calling_ae"] == "SYNTHSCU"
        assert item.receipt["transfer_syntax_uid"] == ExplicitVRLittleEndian
        assert item.receipt["source"] == "dimse"


def test_receiver_storescu_lands_pydicom_test_files(
    shared_receiver: ReceiverProcess, record_property: Callable[[str, object], None]
) -> None:
    by_ts: dict[str, list[Path]] = {}
    not_proposable: list[str] = []
    for path, ts in pydicom_files_with_meta().items():
        if ts in STORESCU_PROPOSE:
            by_ts.setdefault(ts, []).append(path)
        else:
            not_proposable.append(f"{path.name} ({UID(ts).name})")
    outcomes: dict[str, str] = {}
    for ts, paths in by_ts.items():
        result = subprocess.run(
            [
                "storescu",
                "-v",
                "-nh",
                "-aet",
                "PYDICOMSET",
                *STORESCU_PROPOSE[ts],
                "127.0.0.1",
                str(shared_receiver.port),
                *map(str, paths),
            ],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        got = storescu_outcomes(result.stdout + result.stderr)
        for path in paths:
            outcomes[str(path)] = got.get(str(path), "refused by storescu before sending")
    succeeded = {Path(p) for p, outcome in outcomes.items() if outcome == "success"}
    refused = {Path(p).name: outcome for p, outcome in outcomes.items() if outcome != "success"}
    record_property("storescu_refused", refused)
    record_property("storescu_not_proposable", not_proposable)
    assert len(succeeded) >= 40
    # Files that storescu sent and we refused must be ones the archive cannot take.
    for name, outcome in refused.items():
        assert "Store Response" not in outcome or "DataSetDoesNotMatchSOPClass" in outcome, (
            name,
            outcome,
        )
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in succeeded}
    landed = wait_sealed(shared_receiver.data_dir, uids)
    mismatched = []
    for path in succeeded:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid in landed, path.name
        if not _store_ok(landed, uid, dataset_bytes_of_file(path)):
            # DCMTK re-serialises what it parsed (padding, lengths), so the bytes it sent are
            # not the file's; then the same top-level elements and pixel data must arrive.
            original = pydicom.dcmread(path)
            assert any(_same_elements(pydicom.dcmread(i.path), original) for i in landed[uid]), (
                path.name
            )
            mismatched.append(path.name)
    record_property("storescu_reencoded", mismatched)
    print(
        f"storescu refused: {refused}\nnot proposable: {not_proposable}\n"
        f"re-encoded by storescu: {mismatched}"
    )


def test_receiver_pynetdicom_scu_lands_pydicom_test_files_byte_identical(
    shared_receiver: ReceiverProcess,
) -> None:
    ae = AE(ae_title="PYNETSCU")
    acked: dict[str, list[bytes]] = {}
    refused: dict[str, int] = {}
    for path, ts in pydicom_files_with_meta().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            continue
        tsyntax = UID(ts)
        ae.requested_contexts = []
        ae.add_requested_context(ds.SOPClassUID, [ts])
        assoc = ae.associate("127.0.0.1", shared_receiver.port, ae_title="VANNAHCLOUD")
        if not assoc.is_established:
            refused[path.name] = -1
            continue
        try:
            status = assoc.send_c_store(ds)
        except (ValueError, AttributeError, TypeError):
            assoc.abort()
            continue  # pynetdicom itself refuses (e.g. a private SOP class)
        assoc.release()
        if status.get("Status") == StoreStatus.SUCCESS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sent = encode(
                    ds, tsyntax.is_implicit_VR, tsyntax.is_little_endian, tsyntax.is_deflated
                )
            acked.setdefault(str(ds.SOPInstanceUID), []).append(sent)
        else:
            refused[path.name] = int(status.get("Status", -2))
    assert sum(len(v) for v in acked.values()) >= 40, refused
    assert set(refused.values()) <= {
        -1,
        StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        StoreStatus.CANNOT_UNDERSTAND,
    }, refused
    # 0xC000 only for a file whose pixel data is cut short (ingest would quarantine it).
    assert {
        name for name, status in refused.items() if status == StoreStatus.CANNOT_UNDERSTAND
    } <= {"MR_truncated.dcm"}, refused

    def all_landed() -> bool:
        landed = sealed_instances(shared_receiver.data_dir)
        return all(
            any(_store_ok(landed, uid, sent) for sent in versions)
            and any(i.receipt and i.receipt["calling_ae"] == "PYNETSCU" for i in landed[uid])
            for uid, versions in acked.items()
        )

    deadline = time.monotonic() + 30  # batches seal by age; this only bounds a failure
    while not all_landed():
        assert time.monotonic() < deadline, "acknowledged instances missing or altered"
        time.sleep(0.1)


def _send_many(
    port: int,
    calling_ae: str,
    count: int,
    acked: list[str],
    errors: list[BaseException],
    seed: int = 0,
    strict: bool = False,
    dimse_timeout: float = 60,
) -> None:
    """Send `count` CT instances on one association; with `strict`, any refusal or dropped
    association is an error (without it, a killed receiver just ends the send).
    `dimse_timeout` bounds the wait for each answer."""
    try:
        ae = AE(ae_title=calling_ae)
        # Deadlines for a hung peer on a loaded CI machine, not performance thresholds.
        ae.acse_timeout = ae.network_timeout = 60
        ae.dimse_timeout = dimse_timeout
        ae.add_requested_context(MODALITIES["CT"].sop_class_uid, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="VANNAHCLOUD")
        if not assoc.is_established:
            raise AssertionError("association refused")
        for i in range(count):
            # Read back from Part-10 so the data set's own encoding is explicit VR LE.
            ds = pydicom.dcmread(
                BytesIO(to_part10(make_instance("CT", rows=32, columns=32, seed=seed + i)))
            )
            status = assoc.send_c_store(ds)
            if status.get("Status") == StoreStatus.SUCCESS:
                acked.append(str(ds.SOPInstanceUID))
            elif strict:
                raise AssertionError(f"{calling_ae} #{i}: status {status!r}")
            elif not assoc.is_established:
                return
        assoc.release()
    except BaseException as exc:
        errors.append(exc)


def test_receiver_serves_concurrent_associations_on_several_workers(
    shared_receiver: ReceiverProcess,
) -> None:
    acked: list[str] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(
            target=_send_many,
            args=(shared_receiver.port, f"CONC{i}", 5, acked, errors),
            kwargs={"strict": True},
        )
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(acked) == 16 * 5
    landed = wait_sealed(shared_receiver.data_dir, set(acked))
    assert set(acked) <= landed.keys()
    pids = {item.batch_id.split("-")[2] for uid in acked for item in landed[uid]}
    assert len(pids) > 1, pids


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead


def test_receiver_out_of_resources_when_the_write_fails(
    receiver_process: Callable[..., ReceiverProcess],
) -> None:
    rx = receiver_process(port=0, workers=1, preexec_fn=_limit_file_size)
    ae = AE(ae_title="BIGSCU")
    ae.add_requested_context(MODALITIES["CT"].sop_class_uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="VANNAHCLOUD")
    big = make_instance("CT")  # 512 x 512 x 2 bytes > the 200 kB file size limit
    small = make_instance("CT", rows=16, columns=16)
    assert assoc.send_c_store(big).Status == StoreStatus.OUT_OF_RESOURCES
    assert assoc.send_c_store(small).Status == StoreStatus.SUCCESS
    assoc.release()
    assert rx.stop() == 0
    landing = rx.data_dir / "landing"
    names = [p.name for p in landing.rglob("*") if p.is_file()]
    assert not [n for n in names if n.startswith(".tmp-")]
    assert f"{big.SOPInstanceUID}.dcm" not in names
    assert set(sealed_instances(rx.data_dir)) == {str(small.SOPInstanceUID)}
    assert "landing write of" in rx.log()


def test_receiver_sigkill_loses_no_acknowledged_instance(
    receiver_process: Callable[..., ReceiverProcess],
) -> None:
    rx = receiver_process(port=0, workers=2)
    acked: list[str] = []
    errors: list[BaseException] = []
    # pynetdicom does not wake a C-STORE waiting for its answer when the connection dies:
    # after the SIGKILL each sender waits `dimse_timeout` (an answer slower than that
    # before it only ends that sender early; the others make the 60 acknowledgements).
    threads = [
        threading.Thread(
            target=_send_many,
            args=(rx.port, f"KILL{i}", 200, acked, errors, i),
            kwargs={"dimse_timeout": 5},
            daemon=True,
        )
        for i in range(6)
    ]
    for t in threads:
        t.start()
    while len(acked) < 60 and any(t.is_alive() for t in threads):
        time.sleep(0.01)
    rx.kill_group()
    # The restarted receiver seals what the killed workers left open. It starts while the
    # senders still wait (none associates again; only the killed one could acknowledge).
    rx.start()
    for t in threads:
        t.join(timeout=60)
    acknowledged = set(acked)
    assert len(acknowledged) >= 60
    assert rx.stop() == 0
    landed = sealed_instances(rx.data_dir)
    missing = acknowledged - landed.keys()
    assert not missing
    assert not list((rx.data_dir / "landing" / "open").iterdir())
    for uid in acknowledged:
        for item in landed[uid]:
            ds = pydicom.dcmread(item.path)
            assert str(ds.SOPInstanceUID) == uid
            assert item.dataset_bytes() == encode(ds, False, True)


def test_receiver_port_zero_stops_cleanly_and_seals_batches(
    receiver_process: Callable[..., ReceiverProcess],
) -> None:
    rx = receiver_process(port=0, workers=2)
    assert rx.port > 0
    acked: list[str] = []
    errors: list[BaseException] = []
    _send_many(rx.port, "PORTZERO", 3, acked, errors)
    assert not errors
    assert rx.stop() == 0  # and the whole process group is gone (checked in stop)
    assert set(acked) <= sealed_instances(rx.data_dir).keys()
    assert not list((rx.data_dir / "landing" / "open").iterdir())


def test_receiver_restarts_a_worker_that_dies(
    receiver_process: Callable[..., ReceiverProcess],
) -> None:
    rx = receiver_process(port=0, workers=2)
    pids = set(re.findall(r"receiver-worker-0\[(\d+)\]", rx.log()))
    (pid,) = pids
    os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (
        "exited with code -9; restarting" not in rx.log()
        or rx.log().count("worker 0 accepting") < 2
    ):
        assert time.monotonic() < deadline, rx.log()
        time.sleep(0.1)
    for _ in range(6):  # both workers answer (connections spread over them)
        result = subprocess.run(
            ["echoscu", "127.0.0.1", str(rx.port)], env=DCMTK_ENV, timeout=60, check=False
        )
        assert result.returncode == 0
    assert rx.stop() == 0
