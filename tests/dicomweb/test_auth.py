"""Authentication, roles, study scopes, viewer launch and audit of the DICOMweb service, over
real HTTP (uvicorn on a free port) with dicomweb-client: API keys, Basic, HS256 JWTs, and
RS256/ES256 JWTs whose keys a loopback JWKS server hands out."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import duckdb
import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dicomweb_client import DICOMwebClient
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydicom.uid import generate_uid

from dicomweb.app import create_app
from tests.dicomweb.conftest import LOCAL_URL, land_and_ingest, start_server
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.security.audit import audit_view_sql
from vannah_pipelines.security.principal import Scope
from vannah_pipelines.security.tokens import mint_scoped_token
from vannah_pipelines.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
REALM = 'realm="VannahHealthCloud"'
ISSUER = "https://idp.vannah.test/realms/radiology"
AUDIENCE = "vannah-dicomweb"
HS_SECRET = "hs256-shared-secret-of-the-test-0123456789"
KEYS = {"reader": "reader-key-0123456789abcdef", "writer": "writer-key-0123456789abcdef"}
KEYS["admin"] = "admin-key-0123456789abcdef00"
PASSWORDS = {"reader": "reader-password", "boss": "boss-password"}
ORIGIN = "http://viewer.vannah.test"
# Patient IDs and names only in the test's own data (never real).
PATIENTS = {
    "A": ("AUTH-P1", "Alpha^Ann"),
    "B": ("AUTH-P1", "Alpha^Ann"),
    "C": ("AUTH-P2", "Beta^Bo"),
}


@dataclass
class Secured:
    settings: Settings
    url: str  # .../dicom-web
    studies: dict[str, str]  # "A" -> Study Instance UID
    series: dict[str, str]
    sops: dict[str, str]
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey

    @property
    def root(self) -> str:
        return self.url.removesuffix("/dicom-web")


def _jwks_server(jwks: dict[str, Any]) -> ThreadingHTTPServer:
    body = json.dumps(jwks).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _jwk(algorithm: type[RSAAlgorithm] | type[ECAlgorithm], key: Any, kid: str, alg: str) -> Any:
    jwk = algorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, alg=alg, use="sig")
    return jwk


def secured_settings(data_dir: Path, jwks_url: str, **extra: Any) -> Settings:
    return load_settings(
        data_dir=data_dir,
        authentication_enabled=True,
        registered_users=PASSWORDS,
        user_roles={"reader": ["read"]},  # boss is not listed: every role
        api_keys={
            "reader": {"key": KEYS["reader"], "roles": ["read"]},
            "writer": {"key": KEYS["writer"], "roles": ["write"]},
            "admin": {"key": KEYS["admin"], "roles": ["admin"]},
        },
        jwt_hs256_secret=HS_SECRET,
        jwt_jwks_url=jwks_url,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        dicomweb_cors_origins=[ORIGIN],
        free_space_reserve_mb=0,
        **extra,
    )


def build_studies(settings: Settings) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    studies, series, sops, blobs = {}, {}, {}, []
    for name, (patient_id, patient_name) in PATIENTS.items():
        studies[name], series[name] = generate_uid(), generate_uid()
        for number in (1, 2):
            ds = make_instance(
                "CT",
                study_uid=studies[name],
                series_uid=series[name],
                patient_id=patient_id,
                patient_name=patient_name,
                instance_number=number,
                rows=16,
                columns=16,
            )
            sops.setdefault(name, str(ds.SOPInstanceUID))
            blobs.append((str(ds.SOPInstanceUID), to_part10(ds)))
    land_and_ingest(settings, blobs)
    return studies, series, sops


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {
        "keys": [
            _jwk(RSAAlgorithm, rsa_key, "rsa-1", "RS256"),
            _jwk(ECAlgorithm, ec_key, "ec-1", "ES256"),
        ]
    }
    idp = _jwks_server(jwks)
    jwks_url = f"http://127.0.0.1:{idp.server_address[1]}/certs"
    settings = secured_settings(tmp_path_factory.mktemp("secured") / "data", jwks_url)
    studies, series, sops = build_studies(settings)
    server, thread, port = start_server(settings)
    try:
        yield Secured(
            settings,
            f"http://127.0.0.1:{port}/dicom-web",
            studies,
            series,
            sops,
            rsa_key,
            ec_key,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        idp.shutdown()


# ------------------------------------------------------------------------------ helpers


def basic(user: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {value}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def client(secured: Secured, headers: dict[str, str] | None = None) -> DICOMwebClient:
    return DICOMwebClient(secured.url, headers=headers or {})


def external_jwt(
    secured: Secured,
    alg: str = "HS256",
    roles: object = ("read",),
    **claims: Any,
) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": f"user-{alg.lower()}",
        "iat": now,
        "exp": now + 300,
        "roles": list(roles) if isinstance(roles, tuple | list) else roles,
    }
    payload.update(claims)
    if alg == "HS256":
        return jwt.encode(payload, HS_SECRET, algorithm="HS256")
    key, kid = (secured.rsa_key, "rsa-1") if alg == "RS256" else (secured.ec_key, "ec-1")
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


def status_of(call: Any) -> int:
    try:
        call()
    except requests.HTTPError as exc:
        assert exc.response is not None
        return int(exc.response.status_code)
    return 200


def study_uids(answers: list[dict[str, Any]]) -> set[str]:
    return {a["0020000D"]["Value"][0] for a in answers}


def stow_body(secured: Secured, patient_id: str = "AUTH-P3") -> Any:
    return make_instance("CT", patient_id=patient_id, patient_name="Gamma^Gil", rows=16, columns=16)


def worklist_step() -> dict[str, Any]:
    return {
        "patient_name": "Delta^Dee",
        "patient_id": "AUTH-P4",
        "modality": "CT",
        "scheduled_procedure_step_start_date": "20300101",
        "accession_number": f"A{time.time_ns() % 10**12}",
    }


def audit_rows(settings: Settings) -> list[dict[str, Any]]:
    con = duckdb.connect()
    try:
        con.execute(audit_view_sql(str(settings.audit_dir / "*" / "*.jsonl")))
        cursor = con.execute("FROM audit_events ORDER BY occurred_at")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        con.close()


# ------------------------------------------------------------------- 401: no credential


def route_families(s: Secured) -> list[tuple[str, str]]:
    a, sa, ia = s.studies["A"], s.series["A"], s.sops["A"]
    return [
        ("GET", "/dicom-web/studies"),
        ("GET", "/dicom-web/series"),
        ("GET", "/dicom-web/instances"),
        ("GET", f"/dicom-web/studies/{a}/series"),
        ("GET", f"/dicom-web/studies/{a}/series/{sa}/instances"),
        ("GET", f"/dicom-web/studies/{a}"),
        ("GET", f"/dicom-web/studies/{a}/metadata"),
        ("GET", f"/dicom-web/studies/{a}/series/{sa}/instances/{ia}/frames/1"),
        ("GET", f"/dicom-web/studies/{a}/series/{sa}/instances/{ia}/rendered"),
        ("GET", f"/dicom-web/wado?requestType=WADO&studyUID={a}&seriesUID={sa}&objectUID={ia}"),
        ("POST", "/dicom-web/studies"),
        ("POST", f"/dicom-web/studies/{a}"),
        ("GET", "/dicom-web/worklist/items"),
        ("POST", "/dicom-web/worklist/items"),
        ("PUT", "/dicom-web/worklist/items/X1"),
        ("DELETE", "/dicom-web/worklist/items/X1"),
        ("GET", "/dicom-web/openapi.json"),
        ("GET", "/dicom-web/docs"),
        ("GET", "/dicom-web/no-such-route"),
        ("GET", f"/viewer/launch?studyUID={a}"),
    ]


def test_auth_every_route_family_without_credentials_is_401(secured: Secured) -> None:
    for method, path in route_families(secured):
        response = requests.request(method, secured.root + path, allow_redirects=False)
        assert response.status_code == 401, (method, path, response.text[:200])
        challenges = response.headers["WWW-Authenticate"]
        assert f'Bearer {REALM}, error="invalid_request"' in challenges, challenges
        assert f"Basic {REALM}" in challenges, challenges
        reason = response.json()["00000902"]["Value"][0]
        assert "credentials required" in reason


def test_auth_bad_credentials_are_401_with_invalid_token(secured: Secured) -> None:
    for headers in (
        {"X-API-Key": "not-a-key-0123456789"},
        bearer("not-a-key-0123456789"),
        bearer("a.b.c"),
        basic("reader", "wrong"),
        basic("nobody", "reader-password"),
        {"Authorization": "Digest username=reader"},
    ):
        response = requests.get(secured.url + "/studies", headers=headers)
        assert response.status_code == 401, headers
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    with pytest.raises(requests.HTTPError) as refused:
        client(secured, basic("reader", "wrong")).search_for_studies()
    assert refused.value.response is not None and refused.value.response.status_code == 401


def test_auth_cors_preflight_needs_no_credentials(secured: Secured) -> None:
    response = requests.options(
        secured.url + "/studies",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, x-api-key",
        },
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "x-api-key" in allowed
    # A 401 carries the CORS headers, so the viewer can read it.
    refused = requests.get(secured.url + "/studies", headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_auth_static_viewer_paths_are_not_guarded(secured: Secured) -> None:
    # The OHIF files (another module) carry no patient data: no credential asked there.
    response = requests.get(secured.root + "/viewer/index.html")
    assert response.status_code != 401


# --------------------------------------------------------------- credentials that work


def test_auth_api_key_header_and_bearer_read(secured: Secured) -> None:
    for headers in ({"X-API-Key": KEYS["reader"]}, bearer(KEYS["reader"])):
        found = study_uids(client(secured, headers).search_for_studies())
        assert set(secured.studies.values()) <= found


def test_auth_basic_registered_user_reads(secured: Secured) -> None:
    dw = client(secured, basic("reader", PASSWORDS["reader"]))
    assert set(secured.studies.values()) <= study_uids(dw.search_for_studies())
    metadata = dw.retrieve_study_metadata(secured.studies["C"])
    assert len(metadata) == 2


def test_auth_hs256_rs256_es256_jwts_read(secured: Secured) -> None:
    for alg in ("HS256", "RS256", "ES256"):
        dw = client(secured, bearer(external_jwt(secured, alg)))
        assert set(secured.studies.values()) <= study_uids(dw.search_for_studies()), alg
        instance = dw.retrieve_instance(
            secured.studies["A"], secured.series["A"], secured.sops["A"]
        )
        assert str(instance.SOPInstanceUID) == secured.sops["A"]


def test_auth_jwt_nested_roles_claim_is_not_read_by_default(secured: Secured) -> None:
    # Roles in another claim than jwt_roles_claim: valid token, no role, 403.
    token = external_jwt(secured, "RS256", roles=None, realm_access={"roles": ["read"]})
    response = requests.get(secured.url + "/studies", headers=bearer(token))
    assert response.status_code == 403
    assert "lacks the read role" in response.json()["00000902"]["Value"][0]


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256"])
@pytest.mark.parametrize(
    "claims",
    [{"iss": "https://evil.test"}, {"aud": "someone-else"}, {"exp": 1_000_000}],
    ids=["issuer", "audience", "expired"],
)
def test_auth_jwt_wrong_issuer_audience_or_expired_is_401(
    secured: Secured, alg: str, claims: dict[str, Any]
) -> None:
    token = external_jwt(secured, alg, **claims)
    response = requests.get(secured.url + "/studies", headers=bearer(token))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_auth_jwt_signed_by_another_key_is_401(secured: Secured) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 60, "roles": ["admin"]}
    forged = jwt.encode(claims, other, algorithm="RS256", headers={"kid": "rsa-1"})
    hs_forged = jwt.encode(claims, "not-the-secret-0123456789012345678", algorithm="HS256")
    for token in (forged, hs_forged):
        assert requests.get(secured.url + "/studies", headers=bearer(token)).status_code == 401


# ------------------------------------------------------------------------- roles (403)


def test_auth_read_only_credentials_cannot_store_or_change_worklist(secured: Secured) -> None:
    readers = [
        {"X-API-Key": KEYS["reader"]},
        basic("reader", PASSWORDS["reader"]),
        bearer(external_jwt(secured, "HS256")),
    ]
    for headers in readers:
        dw = client(secured, headers)
        assert status_of(lambda dw=dw: dw.store_instances([stow_body(secured)])) == 403
        url = secured.url + "/worklist/items"
        assert requests.post(url, json=worklist_step(), headers=headers).status_code == 403
        assert requests.delete(url + "/X1", headers=headers).status_code == 403
        assert requests.get(url, headers=headers).status_code == 200


def test_auth_write_and_admin_credentials_store(secured: Secured) -> None:
    for headers in ({"X-API-Key": KEYS["writer"]}, basic("boss", PASSWORDS["boss"])):
        ds = stow_body(secured)
        client(secured, headers).store_instances([ds])
        step = worklist_step()
        created = requests.post(secured.url + "/worklist/items", json=step, headers=headers)
        assert created.status_code == 201, created.text


# ------------------------------------------------------------------------------- scopes


def test_auth_study_token_reads_its_study_and_nothing_else(secured: Secured) -> None:
    a, b = secured.studies["A"], secured.studies["B"]
    token = mint_scoped_token(secured.settings, "ris", Scope(frozenset({a})))
    dw = client(secured, bearer(token))
    assert study_uids(dw.search_for_studies()) == {a}
    assert study_uids(dw.search_for_studies(search_filters={"PatientID": "AUTH-P1"})) == {a}
    assert dw.search_for_studies(search_filters={"StudyInstanceUID": b}) == []
    assert study_uids(dw.search_for_studies(limit=1)) == {a}
    assert dw.search_for_studies(offset=1) == []
    assert study_uids(dw.search_for_series()) == {a}
    assert study_uids(dw.search_for_instances()) == {a}
    assert len(dw.search_for_instances(study_instance_uid=a)) == 2
    assert len(dw.retrieve_study_metadata(a)) == 2
    dw.retrieve_instance(a, secured.series["A"], secured.sops["A"])
    assert status_of(lambda: dw.retrieve_study_metadata(b)) == 403
    assert status_of(lambda: dw.search_for_series(study_instance_uid=b)) == 403
    assert status_of(lambda: dw.retrieve_instance(b, secured.series["B"], secured.sops["B"])) == 403
    assert status_of(lambda: dw.store_instances([stow_body(secured)])) == 403
    wado = secured.url + "/wado?requestType=WADO&contentType=application/dicom"
    ok = f"{wado}&studyUID={a}&seriesUID={secured.series['A']}&objectUID={secured.sops['A']}"
    other = f"{wado}&studyUID={b}&seriesUID={secured.series['B']}&objectUID={secured.sops['B']}"
    assert requests.get(ok, headers=bearer(token)).status_code == 200
    denied = requests.get(other, headers=bearer(token))
    assert denied.status_code == 403
    assert "outside this token's scope" in denied.json()["00000902"]["Value"][0]
    # Another study's instance named under the allowed study is simply not there.
    mixed = f"{wado}&studyUID={a}&seriesUID={secured.series['B']}&objectUID={secured.sops['B']}"
    assert requests.get(mixed, headers=bearer(token)).status_code == 404
    worklist = requests.get(secured.url + "/worklist/items", headers=bearer(token))
    assert worklist.status_code == 403


def test_auth_patient_token_reads_that_patients_studies_only(secured: Secured) -> None:
    a, b, c = (secured.studies[k] for k in "ABC")
    token = mint_scoped_token(secured.settings, "ris", Scope(patient_id="AUTH-P1"))
    dw = client(secured, bearer(token))
    assert study_uids(dw.search_for_studies()) == {a, b}
    assert study_uids(dw.search_for_instances()) == {a, b}
    assert len(dw.retrieve_study_metadata(b)) == 2
    assert status_of(lambda: dw.retrieve_study_metadata(c)) == 403
    assert status_of(lambda: dw.retrieve_study_metadata(generate_uid())) == 403


def test_auth_expired_and_tampered_launch_tokens_are_401(secured: Secured) -> None:
    a, c = secured.studies["A"], secured.studies["C"]
    expired = mint_scoped_token(
        secured.settings, "ris", Scope(frozenset({a})), ttl_seconds=60, now=time.time() - 3600
    )
    response = requests.get(secured.url + "/studies", headers=bearer(expired))
    assert response.status_code == 401
    assert "expired" in response.json()["00000902"]["Value"][0]
    good = mint_scoped_token(secured.settings, "ris", Scope(frozenset({a})))
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["vannah_scope"] = {"studies": [c]}
    claims["roles"] = ["admin"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    for token in (f"{header}.{forged}.{signature}", good[:-4] + "AAAA", good + "x"):
        response = requests.get(f"{secured.url}/studies/{c}/metadata", headers=bearer(token))
        assert response.status_code == 401, token


# ------------------------------------------------------------------------- viewer launch


def _token_of(location: str) -> str:
    (token,) = parse_qs(urlsplit(location).query)["token"]
    return token


def test_auth_viewer_launch_redirects_with_a_working_token(secured: Secured) -> None:
    a, b = secured.studies["A"], secured.studies["B"]
    headers = {"X-API-Key": KEYS["reader"]}
    response = requests.get(
        f"{secured.root}/viewer/launch",
        params={"studyUID": a},
        headers=headers,
        allow_redirects=False,
    )
    assert response.status_code == 302, response.text
    location = response.headers["Location"]
    assert location.startswith(f"{secured.root}/viewer?studyUID={a}&token=")
    assert response.headers["Cache-Control"] == "no-store"
    token = _token_of(location)
    assert study_uids(client(secured, bearer(token)).search_for_studies()) == {a}
    # Patient scope: the patient's other study too, nobody else's.
    response = requests.get(
        f"{secured.root}/viewer/launch",
        params={"studyUID": a, "scope": "patient"},
        headers=headers,
        allow_redirects=False,
    )
    assert response.status_code == 302
    token = _token_of(response.headers["Location"])
    assert study_uids(client(secured, bearer(token)).search_for_studies()) == {a, b}
    # A scoped token launches its own study only; an unknown study is 404.
    launch = f"{secured.root}/viewer/launch"
    own = requests.get(launch, params={"studyUID": a}, headers=bearer(token), allow_redirects=False)
    assert own.status_code == 302
    c = secured.studies["C"]
    out = requests.get(launch, params={"studyUID": c}, headers=bearer(token), allow_redirects=False)
    assert out.status_code == 403
    unknown = requests.get(launch, params={"studyUID": generate_uid()}, headers=headers)
    assert unknown.status_code == 404
    bad = requests.get(launch, params={"studyUID": a, "scope": "all"}, headers=headers)
    assert bad.status_code in (400, 422)
    launches = [r for r in audit_rows(secured.settings) if r["action"] == "launch"]
    assert any(
        r["status"] == "302" and r["study_uids"] == [a] and r["subject"] == "api-key:reader"
        for r in launches
    )
    denied = [r for r in audit_rows(secured.settings) if r["action"] == "access-denied"]
    assert any(
        r["study_uids"] == [c] and "outside this token's scope" in r["detail"] for r in denied
    )


def test_auth_viewer_launch_mints_with_authentication_off(secured: Secured) -> None:
    settings = load_settings(data_dir=secured.settings.data_dir)
    a = secured.studies["A"]
    with TestClient(create_app(settings), base_url=LOCAL_URL) as open_client:
        response = open_client.get("/viewer/launch", params={"studyUID": a}, follow_redirects=False)
        assert response.status_code == 302
        token = _token_of(response.headers["location"])
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "anonymous" and claims["vannah_scope"] == {"studies": [a]}
    # Same data folder, same signing key: the secured service takes it.
    assert study_uids(client(secured, bearer(token)).search_for_studies()) == {a}


def test_auth_vannah_token_prints_a_working_launch_url(secured: Secured) -> None:
    a, b = secured.studies["A"], secured.studies["B"]
    env = {**os.environ, "VANNAH_DATA_DIR": str(secured.settings.data_dir)}
    env.pop("VANNAH_CONFIG", None)
    for extra, expected in (([], {a}), (["--patient", "--ttl", "2m"], {a, b})):
        done = subprocess.run(
            [sys.executable, "-m", "vannah_pipelines.cli", "token", "--study", a, *extra],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        url = done.stdout.strip()
        assert url.startswith(f"{secured.settings.base_url}/viewer?studyUID={a}&token="), url
        token = _token_of(url)
        assert study_uids(client(secured, bearer(token)).search_for_studies()) == expected
    claims = jwt.decode(token, options={"verify_signature": False})
    assert 100 <= claims["exp"] - claims["iat"] <= 120
    minted = [r for r in audit_rows(secured.settings) if r["action"] == "token-minted"]
    assert len(minted) >= 2 and minted[-1]["service"] == "cli" and minted[-1]["study_uids"] == [a]
    unknown = subprocess.run(
        [sys.executable, "-m", "vannah_pipelines.cli", "token", "--study", generate_uid()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert unknown.returncode == 1 and "no study" in unknown.stderr


# --------------------------------------------------------------------------------- audit


def test_auth_audit_one_row_per_request_without_patient_data(
    secured: Secured, caplog: pytest.LogCaptureFixture
) -> None:
    a = secured.studies["A"]
    reader = {"X-API-Key": KEYS["reader"]}
    before = len(audit_rows(secured.settings))
    with caplog.at_level(logging.INFO):
        dw = client(secured, reader)
        dw.search_for_studies(search_filters={"PatientID": "AUTH-P1"})
        dw.retrieve_study_metadata(a)
        requests.get(secured.url + "/studies", headers={"X-API-Key": "wrong-key-0123456789"})
        requests.post(secured.url + "/worklist/items", json=worklist_step(), headers=reader)
        stored = stow_body(secured)
        client(secured, {"X-API-Key": KEYS["writer"]}).store_instances([stored])
    rows = audit_rows(secured.settings)[before:]
    assert [r["action"] for r in rows] == [
        "query",
        "retrieve",
        "login-refused",
        "access-denied",
        "store",
    ]
    query, retrieve, refused, denied, store = rows
    assert query["subject"] == "api-key:reader" and query["auth_method"] == "api-key"
    assert query["roles"] == ["read"] and query["status"] == "200"
    assert query["address"] == "127.0.0.1" and query["outcome"] == "success"
    assert retrieve["study_uids"] == [a] and retrieve["bytes"] > 0
    assert refused["status"] == "401" and refused["outcome"] == "refused"
    assert refused["subject"] == "" and "unknown API key" in refused["detail"]
    assert denied["status"] == "403" and "lacks the write role" in denied["detail"]
    assert store["study_uids"] == [str(stored.StudyInstanceUID)] and store["instances"] == 1
    assert all(r["duration_ms"] is not None and r["duration_ms"] >= 0 for r in rows)
    text = json.dumps([{k: str(v) for k, v in r.items()} for r in rows]) + caplog.text
    for patient_id, name in PATIENTS.values():
        assert patient_id not in text and name.split("^")[0] not in text
    assert "AUTH-P3" not in text and "Gamma" not in text


# ----------------------------------------------------- hostile paths and query values

# Path segments as sent on the wire (already percent-encoded where that is the attack).
HOSTILE_SEGMENTS = (
    "..",
    "%2e%2e",
    "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "..%2f..%2fcatalog",
    "%2fetc%2fpasswd",
    "%00",
    "1.2.3%00",
    "'",
    "%27%20OR%20%271%27%3D%271",
    ";",
    "1.2.3;DROP%20TABLE%20instances",
    "--",
    "1.2.3--",
    "%5C",
    "*",
    "1.2.*",
)
# Query values as meant (they are percent-encoded when sent).
HOSTILE_VALUES = (
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "%2e%2e%2f",
    "\x00",
    "1.2.3\x00",
    "'",
    "' OR '1'='1",
    ";",
    "1.2.3; DROP TABLE instances",
    "--",
    "1.2.3 --",
    "\\",
    "*",
    "1.2.*",
)


def _raw(secured: Secured, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """Send `target` byte for byte (no client-side normalisation of dot segments)."""
    import http.client

    port = int(urlsplit(secured.url).port or 0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        body = None
        send = dict(headers)
        if method in ("POST", "PUT"):
            if "/worklist/" in target:
                body, send["Content-Type"] = (
                    json.dumps(worklist_step()).encode(),
                    "application/json",
                )
            else:
                body = b"--b\r\nContent-Type: application/dicom\r\n\r\nx\r\n--b--\r\n"
                send["Content-Type"] = 'multipart/related; type="application/dicom"; boundary=b'
        conn.request(method, target, body=body, headers=send)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _state(secured: Secured) -> tuple[dict[str, bytes], list[tuple[Any, ...]]]:
    """Every file of the data folder but the audit trail and lock files (a worklist change
    takes the store's lock before it finds the step missing), and the catalog's rows."""
    root, audit = secured.settings.data_dir, secured.settings.audit_dir
    files = {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_relative_to(audit) and p.suffix != ".lock"
    }
    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT sop_instance_uid, study_instance_uid, storage_key FROM read_parquet(?) "
            "ORDER BY 1",
            [str(secured.settings.catalog_dir / "instances" / "**" / "*.parquet")],
        ).fetchall()
    finally:
        con.close()
    return files, rows


def _hostile_requests(s: Secured) -> list[tuple[str, str, bool]]:
    """(method, target, a 200 answer is fine) for every path and query parameter."""
    from urllib.parse import quote

    a, sa, ia = s.studies["A"], s.series["A"], s.sops["A"]
    inst = f"/dicom-web/studies/{a}/series/{sa}/instances/{ia}"
    paths = [
        ("GET", "/dicom-web/studies/{}"),
        ("GET", "/dicom-web/studies/{}/metadata"),
        ("GET", "/dicom-web/studies/{}/series"),
        ("GET", "/dicom-web/studies/{}/instances"),
        ("GET", "/dicom-web/studies/{}/thumbnail"),
        ("GET", f"/dicom-web/studies/{a}/series/{{}}"),
        ("GET", f"/dicom-web/studies/{a}/series/{{}}/metadata"),
        ("GET", f"/dicom-web/studies/{a}/series/{{}}/instances"),
        ("GET", f"/dicom-web/studies/{a}/series/{sa}/instances/{{}}"),
        ("GET", f"/dicom-web/studies/{a}/series/{sa}/instances/{{}}/rendered"),
        ("GET", inst + "/frames/{}"),
        ("GET", inst + "/frames/{}/rendered"),
        ("GET", inst + "/bulk/{}"),
        ("POST", "/dicom-web/studies/{}"),
        ("GET", "/dicom-web/worklist/items/{}"),
        ("PUT", "/dicom-web/worklist/items/{}"),
        ("DELETE", "/dicom-web/worklist/items/{}"),
    ]
    # QIDO matching keys and worklist filters may answer 200 (values are bound, never SQL);
    # "*" is universal matching for any key (PS3.4 C.2.2.2.3).
    queries: list[tuple[str, bool | str]] = [
        ("/dicom-web/studies?PatientID={}", True),
        ("/dicom-web/studies?00100010={}", True),
        ("/dicom-web/studies?StudyDescription={}", True),
        ("/dicom-web/studies?StudyInstanceUID={}", "*"),
        ("/dicom-web/studies?StudyDate={}", "*"),
        ("/dicom-web/studies?limit={}", False),
        ("/dicom-web/studies?offset={}", False),
        ("/dicom-web/studies?includefield={}", False),
        ("/dicom-web/studies?orderby={}", False),
        ("/dicom-web/studies?fuzzymatching={}", False),
        ("/dicom-web/studies?{}=1", False),
        ("/dicom-web/series?SeriesInstanceUID={}", "*"),
        ("/dicom-web/series?Modality={}", True),
        (f"/dicom-web/studies/{a}/instances?SOPInstanceUID={{}}", "*"),
        (f"/dicom-web/wado?requestType=WADO&studyUID={{}}&seriesUID={sa}&objectUID={ia}", False),
        (f"/dicom-web/wado?requestType=WADO&studyUID={a}&seriesUID={{}}&objectUID={ia}", False),
        (f"/dicom-web/wado?requestType=WADO&studyUID={a}&seriesUID={sa}&objectUID={{}}", False),
        (f"/dicom-web/wado?requestType={{}}&studyUID={a}&seriesUID={sa}&objectUID={ia}", False),
        (
            f"/dicom-web/wado?requestType=WADO&studyUID={a}&seriesUID={sa}&objectUID={ia}"
            "&contentType={}",
            False,
        ),
        (
            f"/dicom-web/wado?requestType=WADO&studyUID={a}&seriesUID={sa}&objectUID={ia}"
            "&contentType=image/jpeg&rows={}",
            False,
        ),
        ("/viewer/launch?studyUID={}", False),
        (f"/viewer/launch?studyUID={a}&scope={{}}", False),
        ("/dicom-web/worklist/items?patient_id={}", True),
        ("/dicom-web/worklist/items?modality={}", True),
        ("/dicom-web/worklist/items?date={}", False),
    ]
    found = [(m, t.format(seg), False) for m, t in paths for seg in HOSTILE_SEGMENTS]
    found += [("GET", t.format(quote(v, safe="")), ok) for t, ok in queries for v in HOSTILE_VALUES]
    return found


@pytest.mark.parametrize("who", ["admin-key", "study-token"])
def test_auth_hostile_paths_and_query_values_are_refused_and_change_nothing(
    secured: Secured, who: str
) -> None:
    a = secured.studies["A"]
    if who == "admin-key":
        headers = {"X-API-Key": KEYS["admin"]}
    else:
        headers = bearer(mint_scoped_token(secured.settings, "ris", Scope(frozenset({a}))))
    before = _state(secured)
    answered: dict[int, int] = {}
    for method, target, may_answer in _hostile_requests(secured):
        status, body = _raw(secured, method, target, headers)
        answered[status] = answered.get(status, 0) + 1
        assert status < 500, (method, target, body[:300])
        if status < 400:
            assert may_answer and status == 200, (method, target, status, body[:300])
            assert isinstance(json.loads(body), list), (target, body[:300])
            if who == "study-token" and "/worklist/" not in target:
                assert study_uids(json.loads(body)) <= {a}, target
    after = _state(secured)
    assert after[1] == before[1], "catalog rows changed"
    assert sorted(after[0]) == sorted(before[0]), set(after[0]) ^ set(before[0])
    assert after[0] == before[0], "a file changed"
    assert set(answered) - {200} and all(400 <= s < 500 for s in answered if s != 200), answered
