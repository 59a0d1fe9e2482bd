"""The landing zone: the on-disk contract between the receivers (DIMSE, STOW-RS, import) and ingest."""
