"""Modality Worklist: scheduled procedure steps, their store, C-FIND matching and feeds."""
