"""Suite-wide set-up: the tests' own pynetdicom SCUs get the same reactor-race fix as the
receiver (receiver/pynetdicom_fixes.py); without it a loaded machine loses responses."""

from receiver import pynetdicom_fixes

pynetdicom_fixes.install()
