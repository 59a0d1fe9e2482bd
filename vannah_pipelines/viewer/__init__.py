"""The built-in OHIF viewer: fetching its prebuilt files and preparing them to be served."""
