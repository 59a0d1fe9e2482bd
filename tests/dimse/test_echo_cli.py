"""``vannah echo``: a known modality by name or AE title, or AET@host:port, against a real
``storescp``; a closed port fails with the reason; an unknown name is a usage error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import StoreSCP, free_port, storescp_server
from vannah_pipelines.cli import main
from vannah_pipelines.dimse.peers import UnknownPeerError, parse_address, resolve_peer
from vannah_pipelines.settings import load_settings


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    with storescp_server(tmp_path / "received", "ECHOSCP") as server:
        yield server


def _config(tmp_path: Path, modalities: dict[str, list[object]]) -> Path:
    path = tmp_path / "vannah.json"
    path.write_text(json.dumps({"DicomAet": "VANNAHTEST", "DicomModalities": modalities}))
    return path


def _echo(tmp_path: Path, config: Path, *args: str) -> int:
    return main(["--config", str(config), "--data-dir", str(tmp_path / "data"), "echo", *args])


@pytest.mark.parametrize("how", ["name", "aet", "address"])
def test_echo_command_succeeds_against_storescp(
    tmp_path: Path, scp: StoreSCP, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, {"pacs": ["ECHOSCP", "127.0.0.1", scp.port]})
    destination = {"name": "pacs", "aet": "ECHOSCP", "address": f"ECHOSCP@127.0.0.1:{scp.port}"}
    assert _echo(tmp_path, config, destination[how]) == 0
    out = capsys.readouterr().out
    assert f"ECHOSCP@127.0.0.1:{scp.port}: C-ECHO success (status 0x0000) in " in out
    assert out.rstrip().endswith(" ms")


def test_echo_command_to_a_closed_port_exits_1_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    config = _config(tmp_path, {"down": ["DOWN", "127.0.0.1", port]})
    assert _echo(tmp_path, config, "down", "--timeout", "5") == 1
    err = capsys.readouterr().err
    assert f"DOWN@127.0.0.1:{port}" in err and "cannot connect" in err


def test_echo_command_with_an_unknown_name_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, {"pacs": ["PACS", "127.0.0.1", 104]})
    assert _echo(tmp_path, config, "nowhere") == 2
    err = capsys.readouterr().err
    assert "unknown destination 'nowhere'" in err and "pacs" in err


def test_resolve_peer_prefers_a_name_then_an_ae_title(tmp_path: Path) -> None:
    settings = load_settings(
        _config(tmp_path, {"a": ["AET1", "10.0.0.1", 104], "AET1": ["OTHER", "10.0.0.2", 105]}),
        data_dir=tmp_path / "data",
    )
    assert str(resolve_peer(settings, "AET1")) == "OTHER@10.0.0.2:105"  # the name wins
    assert str(resolve_peer(settings, "OTHER")) == "OTHER@10.0.0.2:105"
    assert str(resolve_peer(settings, "X@[::1]:11112")) == "X@::1:11112"
    with pytest.raises(UnknownPeerError):
        resolve_peer(settings, "NOPE")
    assert parse_address("A@host:0") is None


def test_echo_command_reaches_a_routing_rule_destination_by_rule_name_and_aet(
    tmp_path: Path, scp: StoreSCP, capsys: pytest.CaptureFixture[str]
) -> None:
    rule = {
        "name": "Route CT to AI Pipeline",
        "condition": {"modality": "CT"},
        "destination": {"aet": "ECHOSCP", "host": "127.0.0.1", "port": scp.port},
    }
    config = tmp_path / "vannah.json"
    config.write_text(json.dumps({"DicomAet": "VANNAHTEST", "rules": [rule]}))
    for name in ("Route CT to AI Pipeline", "ECHOSCP"):
        assert _echo(tmp_path, config, name) == 0
        assert f"ECHOSCP@127.0.0.1:{scp.port}: C-ECHO success" in capsys.readouterr().out
