"""The user docs tell the truth about what the code does."""

from pathlib import Path

import pydicom.uid

from receiver.contexts import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from receiver.status import StoreStatus
from vannah_pipelines.settings import Settings

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_conformance_lists_every_transfer_syntax_and_status() -> None:
    text = (DOCS / "conformance.md").read_text()
    for uid in TRANSFER_SYNTAXES:
        assert f"| {uid} |" in text, pydicom.uid.UID(uid).name
    for status in StoreStatus:
        assert f"`0x{status.value:04X}`" in text, status.name
    assert f"({len(STORAGE_SOP_CLASSES)}," in text


def test_configuration_documents_every_setting() -> None:
    text = (DOCS / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"`{name}`" in text, name
        assert f"`VANNAH_{name.upper()}`" in text or name in {"routing_rules"}, name
