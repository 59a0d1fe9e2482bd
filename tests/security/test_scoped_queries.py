"""Study scopes in the query engine and the DICOMweb auth helpers, without a server: the
scope is part of the SQL (limit/offset count allowed rows only), and the pure pieces of
dicomweb/auth.py (route classification, challenges, scope checks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom.uid import generate_uid

from dicomweb.auth import (
    audit_action,
    challenge_headers,
    is_protected,
    require_role,
    require_study,
    scoped_query,
)
from tests.dicomweb.conftest import land_and_ingest
from vannah_pipelines.catalog.lookup import study_patients
from vannah_pipelines.catalog.query import QuerySpec, compile_query, run_query
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.keys import Level
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.errors import AuthenticationError, PermissionDeniedError
from vannah_pipelines.security.principal import ANONYMOUS, Principal, Role, Scope
from vannah_pipelines.settings import load_settings

# Five studies: P1 has three (dates 1..3), P2 two.
PATIENT_OF = {0: "SQ-P1", 1: "SQ-P1", 2: "SQ-P1", 3: "SQ-P2", 4: "SQ-P2"}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CatalogReader, list[str]]]:
    settings = load_settings(data_dir=tmp_path_factory.mktemp("scoped") / "data")
    uids = [generate_uid() for _ in PATIENT_OF]
    blobs = []
    for i, uid in enumerate(uids):
        ds = make_instance(
            "CT",
            study_uid=uid,
            patient_id=PATIENT_OF[i],
            study_date=f"2024010{i + 1}",
            rows=8,
            columns=8,
        )
        blobs.append((str(ds.SOPInstanceUID), to_part10(ds)))
    land_and_ingest(settings, blobs)
    reader = CatalogReader(settings.catalog_dir)
    reader.refresh()
    try:
        yield reader, uids
    finally:
        reader.close()


def _studies(reader: CatalogReader, spec: QuerySpec) -> list[str]:
    return [r["0020000D"]["Value"][0] for r in run_query(reader, spec).rows]


def test_query_within_studies_limits_rows_before_limit_and_offset(
    catalog: tuple[CatalogReader, list[str]],
) -> None:
    reader, uids = catalog
    spec = QuerySpec(Level.STUDY, limit=1, within_studies=(uids[0], uids[4]))
    # Newest first: study 4, then study 0; the other studies never count toward the limit.
    assert _studies(reader, spec) == [uids[4]]
    assert run_query(reader, spec).more
    assert _studies(
        reader, QuerySpec(Level.STUDY, limit=1, offset=1, within_studies=spec.within_studies)
    ) == [uids[0]]
    assert (
        _studies(
            reader, QuerySpec(Level.STUDY, limit=5, offset=2, within_studies=spec.within_studies)
        )
        == []
    )


def test_query_within_patient_or_studies(catalog: tuple[CatalogReader, list[str]]) -> None:
    reader, uids = catalog
    patient = QuerySpec(Level.STUDY, within_studies=(), within_patient="SQ-P2")
    assert set(_studies(reader, patient)) == {uids[3], uids[4]}
    both = QuerySpec(Level.SERIES, within_studies=(uids[0],), within_patient="SQ-P2")
    assert {r["0020000D"]["Value"][0] for r in run_query(reader, both).rows} == {
        uids[0],
        uids[3],
        uids[4],
    }
    nothing = QuerySpec(Level.IMAGE, within_studies=())
    assert "FALSE" in compile_query(nothing).source
    assert run_query(reader, nothing).rows == []
    # A filter naming a study outside the scope finds nothing.
    other = QuerySpec(
        Level.STUDY, filters=(("StudyInstanceUID", uids[1]),), within_studies=(uids[0],)
    )
    assert _studies(reader, other) == []


def test_query_scope_values_are_bound_not_formatted() -> None:
    hostile = "1.2'; DROP TABLE instances; --"
    compiled = compile_query(
        QuerySpec(Level.STUDY, within_studies=(hostile,), within_patient=hostile)
    )
    assert hostile not in compiled.source
    assert [hostile] in compiled.params and hostile in compiled.params


def test_scoped_query_leaves_unscoped_principals_alone() -> None:
    spec = QuerySpec(Level.STUDY, limit=10)
    assert scoped_query(spec, ANONYMOUS) is spec
    scoped = Principal(
        "t", frozenset({Role.READ}), "launch-token", Scope(frozenset({"1.2", "1.1"}))
    )
    assert scoped_query(spec, scoped).within_studies == ("1.1", "1.2")
    patient = Principal("t", frozenset({Role.READ}), "launch-token", Scope(patient_id="P"))
    limited = scoped_query(spec, patient)
    assert limited.within_studies == () and limited.within_patient == "P"


def test_study_patients_skips_unknown_and_invalid(catalog: tuple[CatalogReader, list[str]]) -> None:
    reader, uids = catalog
    found = study_patients(reader, [uids[0], generate_uid(), "../etc", "1.2'--"])
    assert found == {uids[0]: "SQ-P1"}
    assert study_patients(reader, []) == {}


def test_require_study_checks_scope_by_study_and_patient(
    catalog: tuple[CatalogReader, list[str]],
) -> None:
    reader, uids = catalog
    read = frozenset({Role.READ})
    require_study(ANONYMOUS, uids[1], reader)
    study = Principal("t", read, "launch-token", Scope(frozenset({uids[0]})))
    require_study(study, uids[0], reader)
    with pytest.raises(PermissionDeniedError, match="outside this token's scope"):
        require_study(study, uids[1], reader)
    patient = Principal("t", read, "launch-token", Scope(patient_id="SQ-P1"))
    require_study(patient, uids[2], reader)
    for refused in (uids[3], generate_uid(), "not-a-uid"):
        with pytest.raises(PermissionDeniedError):
            require_study(patient, refused, reader)
    with pytest.raises(PermissionDeniedError, match="lacks the read role"):
        require_study(Principal("x", frozenset(), "jwt"), uids[0], reader)


def test_require_role_ranks() -> None:
    admin = Principal("a", frozenset({Role.ADMIN}), "basic")
    require_role(admin, Role.WRITE)
    with pytest.raises(PermissionDeniedError, match="lacks the write role"):
        require_role(Principal("r", frozenset({Role.READ}), "basic"), Role.WRITE)


@pytest.mark.parametrize(
    ("method", "path", "action"),
    [
        ("GET", "/dicom-web/studies", "query"),
        ("GET", "/dicom-web/series/", "query"),
        ("GET", "/dicom-web/instances", "query"),
        ("GET", "/dicom-web/studies/1.2/series", "query"),
        ("GET", "/dicom-web/studies/1.2/instances", "query"),
        ("GET", "/dicom-web/studies/1.2/series/1.3/instances", "query"),
        ("GET", "/dicom-web/openapi.json", "query"),
        ("GET", "/dicom-web/studies/1.2", "retrieve"),
        ("GET", "/dicom-web/studies/1.2/metadata", "retrieve"),
        ("GET", "/dicom-web/studies/1.2/series/1.3", "retrieve"),
        ("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4/frames/1", "retrieve"),
        ("GET", "/dicom-web/wado", "retrieve"),
        ("POST", "/dicom-web/studies", "store"),
        ("POST", "/dicom-web/studies/1.2", "store"),
        ("GET", "/dicom-web/worklist/items", "worklist-query"),
        ("POST", "/dicom-web/worklist/items", "worklist-change"),
        ("DELETE", "/dicom-web/worklist/items/A", "worklist-change"),
        ("GET", "/viewer/launch", "launch"),
    ],
)
def test_audit_action_of_each_route(method: str, path: str, action: str) -> None:
    assert audit_action(method, path) == action


def test_is_protected_covers_api_and_launch_only() -> None:
    assert all(map(is_protected, ["/dicom-web", "/dicom-web/docs", "/viewer/launch"]))
    assert not any(map(is_protected, ["/viewer", "/viewer/app.js", "/", "/dicom-webx/studies"]))


def test_challenge_headers_bearer_and_basic() -> None:
    error = AuthenticationError("credentials required", bearer_error="invalid_request")
    assert challenge_headers(error, basic=False) == [
        (b"www-authenticate", b'Bearer realm="VannahHealthCloud", error="invalid_request"')
    ]
    both = challenge_headers(AuthenticationError('bad"token'), basic=True)
    assert both[0][1] == b'Bearer realm="VannahHealthCloud", error="invalid_token"'
    assert both[1] == (b"www-authenticate", b'Basic realm="VannahHealthCloud"')
    odd = AuthenticationError("x", bearer_error='a"b, c=d')
    assert challenge_headers(odd, basic=False)[0][1].count(b'"') == 4
