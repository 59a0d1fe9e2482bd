"""A separate reader process for the DuckLake tests: ``python -m tests.catalog.lake_reader``.

Reads the LakeConfig as one JSON line on stdin, opens one read-only connection
(``lake.open_reader``), writes ``ready\\n``, then answers each further stdin line (a SQL
query) with an 8-byte big-endian length and the result as an Arrow IPC stream, until EOF.
The connection stays open between queries: what a long-running DICOMweb replica does.
"""

from __future__ import annotations

import io
import json
import sys

import pyarrow as pa

from vannah_pipelines.catalog.lake import LakeConfig, open_reader


def main() -> int:
    config = LakeConfig(**json.loads(sys.stdin.readline()))
    con = open_reader(config)
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin:
        table = con.execute(line).fetch_arrow_table()
        buffer = io.BytesIO()
        with pa.ipc.new_stream(buffer, table.schema) as stream:
            stream.write_table(table)
        out.write(len(buffer.getvalue()).to_bytes(8, "big") + buffer.getvalue())
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
