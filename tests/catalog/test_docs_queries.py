"""Every SQL example in docs/catalog.md runs against a real catalog."""

import re
from pathlib import Path

import duckdb

from tests.catalog.conftest import land
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.writer import CATALOG_DB
from vannah_pipelines.dicom.synthetic import make_instance, to_part10

DOC = Path(__file__).resolve().parents[2] / "docs" / "catalog.md"


def test_catalog_doc_queries_run(paths: IngestPaths) -> None:
    blobs = []
    for modality in ("CT", "MR"):
        ds = make_instance(modality, rows=8, columns=8, KVP="120")
        blobs.append((ds.SOPInstanceUID, to_part10(ds)))
    ingest_batches(paths, [land(paths, blobs), land(paths, [("1.2.3", b"junk" * 50)])])
    queries = [
        q.strip()
        for block in re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)
        for q in block.split(";")
        if q.strip()
    ]
    assert len(queries) >= 5
    con = duckdb.connect(str(paths.catalog_dir / CATALOG_DB), read_only=True)
    results = {q.split("\n")[0]: con.execute(q).fetchall() for q in queries}
    assert results["-- studies of one patient, newest first"]
    kvps = results["-- any header attribute, e.g. KVP (0018,0060) of CT instances"]
    assert [float(kvp) for _, kvp in kvps] == [120.0]
    assert results["-- what was refused, and why"][0][1] == 1
    assert results["-- files still in quarantine, by reason"][0][1] == 1
