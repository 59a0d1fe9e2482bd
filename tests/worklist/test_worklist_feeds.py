"""REST API, HL7 (file and MLLP) and file import: each change visible (or not) via findscu -W."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dicomweb.app import create_app
from dicomweb.routes import worklist as worklist_routes
from tests.worklist.conftest import findscu, needs_dcmtk, step_fields, today
from vannah_pipelines.settings import Settings
from vannah_pipelines.worklist import cli
from vannah_pipelines.worklist.errors import InvalidItemError
from vannah_pipelines.worklist.files import read_worklist_file
from vannah_pipelines.worklist.hl7 import parse_message
from vannah_pipelines.worklist.mllp import MllpServer, frame
from vannah_pipelines.worklist.store import WorklistStore


def _accessions(port: int, out: Path) -> list[str]:
    got, proc = findscu(
        port,
        out,
        "-k",
        "ScheduledProcedureStepSequence",
        "-k",
        "AccessionNumber",
        "-k",
        "PatientName",
    )
    assert proc.returncode == 0, proc.stderr
    return sorted(str(d.AccessionNumber) for d in got)


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    app = create_app(Settings(data_dir=tmp_path / "data"))
    if not any(getattr(r, "path", "").startswith("/dicom-web/worklist") for r in app.routes):
        app.include_router(worklist_routes.router, prefix="/dicom-web")  # until wired in
    return app


@needs_dcmtk
def test_rest_create_update_cancel_list(
    app: FastAPI, store: WorklistStore, mwl_scp: Any, tmp_path: Path
) -> None:
    client = TestClient(app, base_url="http://localhost")
    port = mwl_scp(store)
    url = "/dicom-web/worklist/items"
    r = client.post(url, json=step_fields())
    assert r.status_code == 201, r.text
    assert r.headers["location"].endswith("/worklist/items/SPS1")
    assert client.post(url, json=step_fields()).status_code == 409
    assert _accessions(port, tmp_path / "a") == ["ACC001"]
    r = client.put(f"{url}/SPS1", json=step_fields(accession_number="ACC009", step_id=None))
    assert r.status_code == 200, r.text
    assert _accessions(port, tmp_path / "b") == ["ACC009"]
    assert [s["step_id"] for s in client.get(url).json()] == ["SPS1"]
    assert client.get(url, params={"modality": "MR"}).json() == []
    assert client.delete(f"{url}/SPS1").json()["status"] == "CANCELED"
    assert _accessions(port, tmp_path / "c") == []
    assert client.get(url).json() == []
    assert client.get(url, params={"include_closed": "true"}).json()[0]["status"] == "CANCELED"
    assert client.put(f"{url}/NOPE", json=step_fields(step_id=None)).status_code == 404
    assert client.delete(f"{url}/NOPE").status_code == 404


def test_rest_malformed_json_is_400_with_reasons_and_nothing_changes(app: FastAPI) -> None:
    client = TestClient(app, base_url="http://localhost")
    url = "/dicom-web/worklist/items"
    assert client.post(url, json=step_fields()).status_code == 201
    before = client.get(url).json()
    r = client.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["errors"]
    bad = step_fields(
        step_id="SPS2",
        modality="",
        scheduled_procedure_step_start_date="20241399",
        study_instance_uid="1.2.abc",
        colour="blue",
    )
    r = client.post(url, json=bad)
    assert r.status_code == 400
    text = " ".join(r.json()["errors"])
    for field in (
        "modality",
        "scheduled_procedure_step_start_date",
        "study_instance_uid",
        "colour",
    ):
        assert field in text
    assert client.put(f"{url}/SPS1", json={"patient_id": "X"}).status_code == 400
    assert client.get(url).json() == before


def _orm(
    control: str = "NW",
    *,
    accession: str = "ACC100",
    modality: str = "CT",
    pid: str = "PID100",
    when: str | None = None,
    order_status: str = "",
) -> str:
    when = when or f"{today()}2300"
    obr = ["OBR", "1", "PL100", accession, "CTCHEST^CT CHEST W/O^L"] + [""] * 25
    obr[18], obr[19], obr[20], obr[21], obr[24] = accession, "RP100", "SPS100", "CT01", modality
    return (
        "\r".join(
            [
                "MSH|^~\\&|RIS|HOSP|VANNAH|HOSP|20240101120000||ORM^O01|MSG0001|P|2.3.1",
                f"PID|1||{pid}^^^HOSP||DOE^JOHN^Q||19700101|M",
                "PV1|1|O|||||||1234^REFER^RITA",
                f"ORC|{control}|PL100|{accession}||{order_status}||^^^{when}^^R",
                "|".join(obr),
            ]
        )
        + "\r"
    )


@needs_dcmtk
def test_hl7_file_new_then_cancel(store: WorklistStore, mwl_scp: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = mwl_scp(WorklistStore(data / "catalog" / "worklist"))
    msg = tmp_path / "order.hl7"
    msg.write_text(_orm())
    args = ["--data-dir", str(data), "worklist", "hl7", str(msg)]
    assert _run_cli(args) == 0
    assert _accessions(port, tmp_path / "a") == ["ACC100"]
    msg.write_text(_orm("CA"))
    assert _run_cli(args) == 0
    assert _accessions(port, tmp_path / "b") == []


def _run_cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--data-dir")
    cli.add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def _send(port: int, *messages: str) -> list[str]:
    acks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for message in messages:
            sock.sendall(frame(message))
            data = b""
            while not data.endswith(b"\x1c\r"):
                chunk = sock.recv(65536)
                assert chunk, "connection closed before the ACK"
                data += chunk
            assert data.startswith(b"\x0b")
            acks.append(data[1:-2].decode())
    return acks


@needs_dcmtk
def test_mllp_orders_acked_and_visible(store: WorklistStore, mwl_scp: Any, tmp_path: Path) -> None:
    port = mwl_scp(store)
    server = MllpServer(("127.0.0.1", 0), store)
    server.start()
    try:
        mllp = server.server_address[1]
        new, complete = _send(mllp, _orm(), _orm("SC", order_status="CM"))
        for ack in (new, complete):
            m = parse_message(ack)
            assert (m.get("MSH", 9, 1), m.get("MSA", 1), m.get("MSA", 2)) == (
                "ACK",
                "AA",
                "MSG0001",
            )
        # Completed: no longer on the worklist.
        assert _accessions(port, tmp_path / "a") == []
        (renew,) = _send(mllp, _orm("XO", modality="MR"))
        assert parse_message(renew).get("MSA", 1) == "AA"
        assert _accessions(port, tmp_path / "b") == ["ACC100"]
        # Bad inputs: nothing stored or changed, AE/AR with a reason.
        before = [i.to_json() for i in store.items()]
        missing, wrong_type, unknown = _send(
            mllp,
            _orm(accession="ACC200", modality="", pid=""),
            _orm().replace("ORM^O01", "ADT^A01"),
            _orm("CA", accession="ACC404").replace("SPS100", "SPS404"),
        )
        m = parse_message(missing)
        assert m.get("MSA", 1) == "AE"
        assert "PID-3" in m.get("MSA", 3) and "modality" in missing
        assert parse_message(wrong_type).get("MSA", 1) == "AR"
        assert "unsupported message type" in wrong_type
        assert parse_message(unknown).get("MSA", 1) == "AE"
        assert [i.to_json() for i in store.items()] == before
    finally:
        server.shutdown()
        server.server_close()


def test_broken_wl_file_is_refused_and_nothing_stored(tmp_path: Path) -> None:
    data = tmp_path / "data"
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.dump").write_text(
        "(0010,0010) PN [DOE^JANE]\n(0010,0020) LO [P1]\n(0040,0100) SQ\n(fffe,e000) -\n"
        f"(0008,0060) CS [CT]\n(0040,0002) DA [{today()}]\n(0040,0009) SH [S1]\n"
        "(fffe,e00d) -\n(fffe,e0dd) -\n"
    )
    (folder / "broken.wl").write_bytes(b"DICM? not really" * 10)
    with pytest.raises(InvalidItemError, match=r"broken\.wl"):
        read_worklist_file(folder / "broken.wl")
    assert _run_cli(["--data-dir", str(data), "worklist", "import", str(folder)]) == 1
    assert WorklistStore(data / "catalog" / "worklist").items() == []
    (folder / "broken.wl").unlink()
    assert _run_cli(["--data-dir", str(data), "worklist", "import", str(folder)]) == 0
    assert [i.step_id for i in WorklistStore(data / "catalog" / "worklist").items()] == ["S1"]
