"""DICOM helpers that need nothing but pydicom and the standard library."""
