"""Dagster entry point (workspace.yaml loads it): everything under vannah_pipelines/defs.

Every Dagster process loads this: the code server, the webserver, and each run's own worker
process, so what it costs is paid at every run's start. ``dg.load_defs`` also builds, on
every load, a catalogue of every component type the installed Dagster integrations offer
(for the ``dg`` tools), importing each integration: about 1 s of a run worker's 2.6 s start
on this machine's 2 cores. This project declares no components, so its definitions are
collected from the modules of ``vannah_pipelines.defs`` (the same assets, checks, jobs,
sensors and schedules: tests/pipelines/test_definitions.py compares the two).
"""

import warnings

import dagster as dg

import vannah_pipelines.defs
from vannah_pipelines.defs.resources import RESOURCES


@dg.definitions
def defs() -> dg.Definitions:
    with warnings.catch_warnings():  # Dagster marks the loader "preview"; it is pinned
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.load_definitions_from_package_module(vannah_pipelines.defs, resources=RESOURCES)
