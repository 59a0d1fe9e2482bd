"""The landing zone: the on-disk contract between receivers (DIMSE, STOW, import) and ingest."""
