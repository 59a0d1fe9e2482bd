"""Layering (STYLE.md section 3): the worklist package imports no framework."""

import subprocess
import sys

import pytest

PURE = [
    "vannah_pipelines.worklist.model",
    "vannah_pipelines.worklist.store",
    "vannah_pipelines.worklist.find",
    "vannah_pipelines.worklist.files",
    "vannah_pipelines.worklist.hl7",
    "vannah_pipelines.worklist.mllp",
    "vannah_pipelines.worklist.cli",
]


@pytest.mark.parametrize("module", PURE)
def test_worklist_module_imports_no_framework(module: str) -> None:
    code = (
        "import sys\n"
        "for name in ('dagster', 'pynetdicom', 'fastapi', 'starlette'):\n"
        "    sys.modules[name] = None\n"
        f"import {module}\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
