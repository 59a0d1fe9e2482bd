"""Dagster glue, autoloaded: one folder per domain. Bodies unpack, call the pure layer, report."""
