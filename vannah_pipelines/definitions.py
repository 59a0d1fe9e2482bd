"""Dagster entry point (workspace.yaml loads it): everything under vannah_pipelines/defs."""

import dagster as dg

import vannah_pipelines.defs


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_defs(vannah_pipelines.defs)
