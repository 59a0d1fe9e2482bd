"""Outbound DICOM: the association requestor, C-STORE sender and C-ECHO of C-MOVE and routing."""
