"""The query engine's DICOM JSON (written mostly by DuckDB) equals a plain Python encoding
of the same catalog rows (PS3.18 F.2), over pydicom's test files and awkward values."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import duckdb
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from tests.catalog.conftest import land, pydicom_test_files
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.query import (
    AnswerEncoder,
    QuerySpec,
    compile_query,
    run_query,
    run_query_json,
)
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.keys import Attribute, Level
from vannah_pipelines.dicom.synthetic import make_instance, to_part10

BASE = 'http://host:8042/dicom-web/"odd\\base'
_INT_VRS = {"IS", "US", "UL", "SS", "SL", "UV", "SV"}
_FLOAT_VRS = {"DS", "FL", "FD"}

# Names and texts a catalog column may hold: PN groups and repeats, JSON's special
# characters, non-ASCII, empty groups and values, more than three groups.
AWKWARD_NAMES = [
    "Doe^Jane=山田^太郎=やまだ^たろう",
    "A\\B=C",
    "=Ideo^Only",
    'O"Brien^Back\\slash',
    "Müller^Zoë",
    "=",
    "",
    "Plain^Name",
]
# Ingest cannot read these from a file today (pydicom's PN to_json_dict raises
# IndexError on an empty value or group), so they are tested on a table of their own.
UNREADABLE_NAMES = ["a==c", "a=b=c=d", "Trailing\\", "\\", "\\=x\\"]
AWKWARD_TEXTS = [
    'say "hi" \\ and \\\\ twice',
    "ctrl \x01\x1f tab\tnew\nline",
    "日本語 / ümlaut \u2028",
    "",
    "x\\",
]


def _expected_value(vr: str, value: Any) -> list[Any]:
    """PS3.18 F.2.3 "Value" of a catalog value, written independently of the engine."""
    if vr == "PN":
        names: list[Any] = []
        for part in str(value).split("\\"):
            groups = part.split("=")
            keys = ("Alphabetic", "Ideographic", "Phonetic")
            names.append({k: g for k, g in zip(keys, groups, strict=False) if g})
        return names
    if vr in _INT_VRS or vr in _FLOAT_VRS:
        kind = int if vr in _INT_VRS else float
        numbers = (
            [value] if isinstance(value, int | float) else [kind(p) for p in value.split("\\")]
        )
        return [None if isinstance(n, float) and not math.isfinite(n) else n for n in numbers]
    return str(value).split("\\")


def _expected(
    row: dict[str, Any], returned: Sequence[Attribute], header: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in sorted(returned, key=lambda a: a.tag):
        if attr.column is None:
            out[attr.tag] = header.get(attr.tag, {"vr": attr.vr})
            continue
        value = row[attr.column]
        if value is None or value == "":
            out[attr.tag] = {"vr": attr.vr}
            continue
        try:
            out[attr.tag] = {"vr": attr.vr, "Value": _expected_value(attr.vr, value)}
        except ValueError:
            out[attr.tag] = {"vr": attr.vr}
    return out


def _retrieve_url(answer: dict[str, Any], level: Level) -> str:
    def uid(tag: str) -> str:
        return str(answer.get(tag, {}).get("Value", [""])[0])

    url = f"{BASE}/studies/{uid('0020000D')}"
    if level in (Level.SERIES, Level.IMAGE):
        url += f"/series/{uid('0020000E')}"
    if level == Level.IMAGE:
        url += f"/instances/{uid('00080018')}"
    return url


def _expected_answers(reader: CatalogReader, spec: QuerySpec) -> list[dict[str, Any]]:
    compiled = compile_query(spec)
    rows = reader.query_dicts(f"SELECT * {compiled.source}", compiled.params)
    if spec.limit is not None:
        rows = rows[: spec.limit]
    headers: dict[tuple[str, str], str] = {}
    if any(a.column is None for a in compiled.returned):
        headers = reader.headers(
            [(r["source_file"], r["sop_instance_uid"], r["checksum"]) for r in rows]
        )
    answers = []
    for r in rows:
        header = "{}"
        if headers:
            header = headers.get((r["sop_instance_uid"], r["checksum"])) or "{}"
        # NaN (FL/FD) is null in JSON, as orjson writes it.
        answers.append(
            _expected(r, compiled.returned, json.loads(header, parse_constant=lambda _: None))
        )
    return answers


def _awkward_instance(i: int, name: str) -> pydicom.Dataset:
    text = AWKWARD_TEXTS[i % len(AWKWARD_TEXTS)]
    ds = make_instance(
        "CT" if i % 2 else "MR",
        study_uid=generate_uid(),
        patient_id=f'P"{i}\\x' if i % 3 else "",
        patient_name=name,
        rows=8,
        columns=8,
        SpecificCharacterSet="ISO_IR 192",
        ReferringPhysicianName=AWKWARD_NAMES[-1 - i],
        StudyDescription=text,
        SeriesDescription=text,
        AccessionNumber="" if i % 4 == 0 else f"ACC{i}",
        ImageType="ORIGINAL\\PRIMARY\\AXIAL" if i % 2 else "DERIVED",
        PatientAge="",
    )
    # Header-only attributes with values no number reads (IS, DS), as some devices send.
    for tag, vr, value in ((0x00200012, "IS", b"x1"), (0x00180050, "DS", b"abc\\2.5 ")):
        if i % 2:
            ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CatalogReader]:
    root = tmp_path_factory.mktemp("archive")
    paths = IngestPaths(root / "landing", root / "hot", root / "catalog", root / "quarantine")
    blobs: dict[str, bytes] = {}
    for f in pydicom_test_files():
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        blobs[str(ds.SOPInstanceUID)] = f.read_bytes()
    for i, name in enumerate(AWKWARD_NAMES):
        ds = _awkward_instance(i, name)
        blobs[str(ds.SOPInstanceUID)] = to_part10(ds)
    batch = land(paths, list(blobs.items()))
    result = ingest_batches(paths, [batch])
    assert result.instances > 30
    reader = CatalogReader(paths.catalog_dir)
    names = {r[0] for r in reader.query("SELECT patient_name FROM studies")}
    assert {"Doe^Jane=山田^太郎=やまだ^たろう", "A\\B=C", 'O"Brien^Back\\slash'} <= names
    yield reader
    reader.close()


SPECS = [
    QuerySpec(Level.PATIENT, include_all=True),
    QuerySpec(Level.STUDY),
    QuerySpec(Level.STUDY, include_all=True),
    QuerySpec(Level.STUDY, (("PatientName", "*=*"),), fuzzy=True, limit=3, offset=1),
    QuerySpec(Level.SERIES, include_all=True),
    QuerySpec(Level.IMAGE, include_all=True),
    QuerySpec(
        Level.IMAGE,
        (("Modality", "CT"),),
        include=(
            "AcquisitionNumber",
            "SliceThickness",
            "PatientAge",
            "ImageOrientationPatient",
            "WindowCenter",
            "RetrieveURL",
            "PixelSpacing",
        ),
    ),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.level}-{len(s.include)}")
def test_run_query_matches_a_python_encoding_of_every_row(
    reader: CatalogReader, spec: QuerySpec
) -> None:
    expected = _expected_answers(reader, spec)
    assert expected
    rows = run_query(reader, spec).rows
    assert rows == expected
    assert [list(r) for r in rows] == [list(e) for e in expected]  # members in tag order


@pytest.mark.parametrize("spec", [s for s in SPECS if s.level != Level.PATIENT])
def test_run_query_json_body_is_the_same_answers_with_retrieve_url(
    reader: CatalogReader, spec: QuerySpec
) -> None:
    result = run_query_json(reader, spec, BASE)
    answers = json.loads(result.body)
    expected = _expected_answers(reader, spec)
    for answer in expected:
        # Appended last, or in its place when it was asked for (includefield).
        answer["00081190"] = {"vr": "UR", "Value": [_retrieve_url(answer, spec.level)]}
    assert result.count == len(answers)
    assert answers == expected
    assert [list(a) for a in answers] == [list(e) for e in expected]


def test_answer_encoder_writes_in_python_what_sql_cannot_write_exactly() -> None:
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE t (id INTEGER, is_text VARCHAR, ds_text VARCHAR, ds_double DOUBLE, "
        "dt TIMESTAMP, name VARCHAR, num BIGINT)"
    )
    values = [
        (1, "12", "2.5", 1.5, "2024-01-02 03:04:05", "A=B", 3),
        (2, "1\\-2", "1\\2.5e3", float("nan"), None, "", None),
        (3, "abc", "nan", float("inf"), None, None, 0),
        (4, " 7 ", "x\\1", None, None, 'Q"\\u', -5),
        (5, "", "", -0.0, None, "日本=に", 2**40),
        (6, None, "1.5.2", 1e300, None, "=", 1),
    ]
    values += [
        (7 + i, None, None, None, None, name, None)
        for i, name in enumerate([*UNREADABLE_NAMES, *AWKWARD_NAMES, *AWKWARD_TEXTS])
    ]
    con.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)", values)
    types = {r[0]: r[1] for r in con.execute("DESCRIBE t").fetchall()}
    returned = [
        Attribute("SeriesNumber", "00200011", "IS", "is_text", Level.IMAGE),
        Attribute("SliceThickness", "00180050", "DS", "ds_text", Level.IMAGE),
        Attribute("PixelSpacing", "00280030", "DS", "ds_double", Level.IMAGE),
        Attribute("AcquisitionDateTime", "0008002A", "DT", "dt", Level.IMAGE),
        Attribute("PatientName", "00100010", "PN", "name", Level.IMAGE),
        Attribute("Rows", "00280010", "US", "num", Level.IMAGE),
        Attribute("StudyID", "00200010", "SH", "num", Level.IMAGE),  # a number as text
    ]
    encoder = AnswerEncoder(returned, types, Level.IMAGE)
    assert any(s.startswith("is_text ") for s in encoder.select)  # Python writes these
    rows = con.execute(f"SELECT {', '.join(encoder.select)} FROM t ORDER BY id").fetchall()
    raw = con.execute("SELECT * FROM t ORDER BY id").fetchall()
    names = [d[0] for d in con.execute("SELECT * FROM t").description]
    for text, row in zip(encoder.texts(rows), raw, strict=True):
        expected = _expected(dict(zip(names, row, strict=True)), returned, {})
        assert json.loads(text) == expected
        assert list(json.loads(text)) == list(expected)
    # Python alone (run_query's encoder) writes the same answers, members in tag order.
    python = AnswerEncoder(returned, types, Level.IMAGE, in_sql=False)
    assert all(s.split(" AS ")[0] in names for s in python.select)  # raw columns only
    rows = con.execute(f"SELECT {', '.join(python.select)} FROM t ORDER BY id").fetchall()
    for answer, text in zip(python.dicts(rows), encoder.texts(rows_sql(con, encoder)), strict=True):
        assert answer == json.loads(text)
        assert list(answer) == list(json.loads(text))


def rows_sql(con: duckdb.DuckDBPyConnection, encoder: AnswerEncoder) -> list[tuple[object, ...]]:
    return con.execute(f"SELECT {', '.join(encoder.select)} FROM t ORDER BY id").fetchall()


def test_python_encoder_refuses_a_retrieve_url() -> None:
    with pytest.raises(ValueError, match="RetrieveURL"):
        AnswerEncoder([], {}, Level.STUDY, BASE, in_sql=False)
