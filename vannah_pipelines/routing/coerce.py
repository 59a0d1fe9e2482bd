"""Per-rule coercion: set, replace, prefix or remove attributes of the copy a rule sends."""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset

from vannah_pipelines.routing.rules import Coercion, keyword_vr


def apply_coercion(ds: Dataset, coercion: Coercion | None) -> Dataset:
    """A copy of `ds` with `coercion` applied; `ds` itself is never changed.

    In order: ``set`` (insert or overwrite), ``replace`` (overwrite only what is present),
    ``prefix`` (prepend to a present value), ``remove`` (delete if present).

    >>> from pydicom.dataset import Dataset
    >>> ds = Dataset(); ds.PatientID = "123"
    >>> out = apply_coercion(ds, Coercion(prefix={"PatientID": "VHC-"}))
    >>> out.PatientID, ds.PatientID
    ('VHC-123', '123')
    """
    out = copy.deepcopy(ds)
    if coercion is None:
        return out
    for keyword, value in coercion.set.items():
        _put(out, keyword, value)
    for keyword, value in coercion.replace.items():
        if keyword in out:
            _put(out, keyword, value)
    for keyword, value in coercion.prefix.items():
        if keyword in out and out[keyword].value not in (None, ""):
            _put(out, keyword, value + str(out[keyword].value))
    for keyword in coercion.remove:
        if keyword in out:
            del out[keyword]
    return out


def _put(ds: Dataset, keyword: str, value: str) -> None:
    if keyword in ds:
        del ds[keyword]  # a new element: its VR is the dictionary's, whatever was stored
    ds.add_new(keyword, keyword_vr(keyword), value)
