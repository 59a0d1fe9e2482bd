"""Readers (in-memory services and researchers' catalog.duckdb) query while ingest writes."""

import subprocess
import sys
import textwrap
import threading

from tests.catalog.conftest import land
from vannah_pipelines.catalog.compaction import ensure_catalog, publish
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.catalog.writer import CATALOG_DB, CatalogWriter
from vannah_pipelines.dicom.synthetic import make_instance, to_part10

_RESEARCHER = textwrap.dedent(
    """
    import sys, time, duckdb
    counts = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        con = duckdb.connect(sys.argv[1], read_only=True)
        n = con.execute("SELECT count(*) FROM instances").fetchone()[0]
        con.execute("SELECT modalities_in_study, count(*) FROM studies GROUP BY 1").fetchall()
        con.close()
        counts.append(n)
        if n >= int(sys.argv[2]):
            break
    assert counts == sorted(counts), counts
    print(len(counts), counts[-1])
    """
)


def test_readers_query_while_ingest_writes(paths: IngestPaths) -> None:
    batches, per_batch = 15, 20
    batch_ids = []
    for b in range(batches):
        blobs = []
        study = make_instance("CT").StudyInstanceUID
        for i in range(per_batch):
            ds = make_instance(
                "MR" if b % 2 else "CT", rows=16, columns=16, study_uid=study, instance_number=i
            )
            blobs.append((ds.SOPInstanceUID, to_part10(ds)))
        batch_ids.append(land(paths, blobs))
    writer = CatalogWriter(paths.catalog_dir)
    ensure_catalog(paths.catalog_dir)
    reader = CatalogReader(paths.catalog_dir)
    researcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _RESEARCHER,
            str(paths.catalog_dir / CATALOG_DB),
            str(batches * per_batch),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for batch_id in batch_ids:
                ingest_batches(paths, [batch_id])
                publish(writer.root)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    seen = []
    while thread.is_alive() or not seen or seen[-1] < batches * per_batch:
        reader.refresh()
        [(n,)] = reader.query("SELECT count(*) FROM instances")
        [(_, instances)] = reader.query(
            "SELECT count(*), coalesce(sum(number_of_study_related_instances), 0) FROM studies"
        )
        assert n == instances and n % per_batch == 0  # whole batches only, never half
        seen.append(n)
        if not thread.is_alive() and n < batches * per_batch:
            reader.refresh()
    thread.join()
    out, err = researcher.communicate(timeout=60)
    assert not errors, errors
    assert researcher.returncode == 0, err
    assert seen == sorted(seen) and seen[-1] == batches * per_batch
    assert int(out.split()[1]) == batches * per_batch
