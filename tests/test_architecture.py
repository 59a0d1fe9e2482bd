"""Layering (STYLE.md section 3): the pure layer imports no framework."""

import subprocess
import sys

import pytest

PURE = [
    "vannah_pipelines.settings",
    "vannah_pipelines.errors",
    "vannah_pipelines.dicom.uids",
    "vannah_pipelines.dicom.headers",
    "vannah_pipelines.dicom.synthetic",
    "vannah_pipelines.landing.layout",
    "vannah_pipelines.landing.plan",
    "vannah_pipelines.landing.importer",
    "vannah_pipelines.catalog.schema",
    "vannah_pipelines.catalog.writer",
    "vannah_pipelines.catalog.reader",
    "vannah_pipelines.catalog.ingest",
    "vannah_pipelines.catalog.checks",
    "vannah_pipelines.storage.base",
    "vannah_pipelines.storage.local",
    "vannah_pipelines.platform",
    "vannah_pipelines.cli",
    "vannah_pipelines.dicom.inspection",
    "vannah_pipelines.dicom.keys",
    "vannah_pipelines.dicom.matching",
    "vannah_pipelines.dicom.json_model",
    "vannah_pipelines.dicom.json_encode",
    "vannah_pipelines.dicom.identifier",
    "vannah_pipelines.catalog.query",
    "vannah_pipelines.catalog.lookup",
    "vannah_pipelines.worklist.store",
    "vannah_pipelines.worklist.find",
    "vannah_pipelines.worklist.hl7",
    "vannah_pipelines.worklist.files",
    "vannah_pipelines.worklist.cli",
    "vannah_pipelines.worklist.model",
    "vannah_pipelines.worklist.mllp",
]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_framework(module: str) -> None:
    code = (
        "import sys\n"
        "for name in ('dagster', 'pynetdicom', 'fastapi', 'starlette'):\n"
        "    sys.modules[name] = None\n"
        f"import {module}\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_dicomweb_imports_no_dagster_or_pynetdicom() -> None:
    code = (
        "import sys\nsys.modules['dagster'] = None\nsys.modules['pynetdicom'] = None\n"
        "import dicomweb.app\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_receiver_imports_no_dagster() -> None:
    code = (
        "import sys\nsys.modules['dagster'] = None\nsys.modules['fastapi'] = None\n"
        "import receiver.handlers, receiver.app, receiver.query_retrieve\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_receiver_loads_the_catalog_stack_only_for_query_retrieve() -> None:
    """A receiver worker that only stores never imports DuckDB or pyarrow (~60 MiB each
    worker); the Q/R handlers bring them in on the first C-FIND / C-GET / C-MOVE."""
    code = (
        "import sys\n"
        "import receiver.app, receiver.fast_store\n"
        "assert 'duckdb' not in sys.modules and 'pyarrow' not in sys.modules, 'eager'\n"
        "import receiver.qr_handlers\n"
        "assert 'duckdb' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
