"""The project's Dagster definitions: every object under vannah_pipelines/defs, loaded
without the component catalogue of ``dg.load_defs`` (vannah_pipelines/definitions.py)."""

import subprocess
import sys
import warnings

import dagster as dg

import vannah_pipelines.defs
from vannah_pipelines.definitions import defs


def _summary(definitions: dg.Definitions) -> dict[str, list[str]]:
    repo = definitions.get_repository_def()
    return {
        "assets": sorted(k.to_user_string() for k in repo.assets_defs_by_key),
        "checks": sorted(k.to_user_string() for k in repo.asset_checks_defs_by_key),
        "jobs": sorted(repo.job_names),
        "sensors": sorted(s.name for s in repo.sensor_defs),
        "schedules": sorted(s.name for s in repo.schedule_defs),
        "resources": sorted(repo.get_top_level_resources()),
    }


def test_the_entry_point_holds_what_dagsters_own_loader_finds() -> None:
    ours = _summary(defs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dg.load_defs(vannah_pipelines.defs)
    # load_defs finds no resource in a module-level dict: bind ours to compare the rest.
    theirs = dg.Definitions.merge(theirs, dg.Definitions(resources={"archive": object()}))
    assert ours == _summary(theirs)
    assert "landed_batch_sensor" in ours["sensors"] and "instance_index" in ours["assets"]
    assert ours["resources"] == ["archive"]


def test_loading_the_definitions_imports_no_integration_component_catalogue() -> None:
    """What load_defs would import on every run's start (dagster-aws's component types);
    in a fresh interpreter: another test of this pytest process may have imported it."""
    code = (
        "import sys; from vannah_pipelines.definitions import defs; defs()"
        ".get_repository_def(); "
        "print(sorted(m for m in sys.modules if m.startswith('dagster_aws')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
