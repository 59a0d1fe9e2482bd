"""What authentication adds to a DICOMweb request: QIDO-RS study search, WADO-RS study
metadata and one instance retrieve, against real ``python -m dicomweb`` processes on one
synthetic archive, with authentication off and on (HS256 JWT, RS256 JWT, Basic, API key).

Two server processes share the data folder: one with ``authentication_enabled`` false, one
with it true (HS256 secret, an RS256 public key file, a registered user, an API key). Each
credential kind has its own keep-alive connection. Rounds are interleaved (each round sends
each request once per credential, in a rotated order), so drift on a shared machine hits
every mode alike, and requests alternate between the two processes (off, hs256, off, rs256,
off, basic, off, api-key), so neither is kept warmer by answering several in a row (without
that, the process answering four requests in five was 0.3 ms faster whatever it checked).
Both servers write the audit row of every request, so the difference is the credential
check alone. Prints per request and mode: p50, p95, min-max, the p50 added over
authentication off (goal: under 1 ms) and over an API key in the same process (a JWT's own
cost), then the in-process cost of ``Authenticator.from_http`` per credential kind.

    .venv/bin/python bench/auth_cost.py                       # 300 rounds
    .venv/bin/python bench/auth_cost.py --rounds 50 --studies 20   # smoke
    .venv/bin/python bench/auth_cost.py --json bench/out/auth_cost.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import timeit
from pathlib import Path

from common import (
    OUT_DIR,
    REPO_ROOT,
    HttpClient,
    Side,
    free_port,
    install_signal_handlers,
    kill_group,
    log,
    print_table,
    run_dir,
    wait_for_port,
)

sys.path.insert(0, str(REPO_ROOT))

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydicom.uid import generate_uid

from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.security.authn import Authenticator
from vannah_pipelines.settings import Settings, load_settings

HS_SECRET = "bench-hs256-secret-0123456789abcdef"
API_KEY = "bench-api-key-0123456789abcdef"
USER, PASSWORD = "bench", "bench-password"
ISSUER, AUDIENCE = "https://idp.bench.test", "vannah-bench"
MODES = ("off", "hs256", "rs256", "basic", "api-key")
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


def build_archive(data_dir: Path, studies: int, per_study: int) -> list[tuple[str, str, str]]:
    """`studies` synthetic CT studies of `per_study` 64x64 instances, landed and ingested;
    returns one (study, series, sop) per study."""
    settings = load_settings(data_dir=data_dir)
    batch = LandingZone(settings.landing_dir).open_batch("bench")
    first: list[tuple[str, str, str]] = []
    for s in range(studies):
        study, series = generate_uid(), generate_uid()
        for i in range(1, per_study + 1):
            ds = make_instance(
                "CT",
                study_uid=study,
                series_uid=series,
                patient_id=f"BENCH-{s % 17}",
                instance_number=i,
                rows=64,
                columns=64,
            )
            if i == 1:
                first.append((study, series, str(ds.SOPInstanceUID)))
            facts = ReceiveFacts(
                str(ds.SOPInstanceUID), str(ds.SOPClassUID), "1.2.840.10008.1.2.1", "bench"
            )
            batch.write_instance(to_part10(ds), facts)
    sealed = batch.seal()
    assert sealed is not None
    paths = IngestPaths(
        settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
    )
    ingest_batches(paths, [sealed.batch_id])
    return first


def credentials(rsa_key: rsa.RSAPrivateKey) -> dict[str, dict[str, str]]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "bench",
        "iat": now,
        "exp": now + 7200,
        "roles": ["read"],
    }
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return {
        "off": {},
        "hs256": {"Authorization": "Bearer " + jwt.encode(claims, HS_SECRET, algorithm="HS256")},
        "rs256": {"Authorization": "Bearer " + jwt.encode(claims, rsa_key, algorithm="RS256")},
        "basic": {"Authorization": f"Basic {basic}"},
        "api-key": {"X-API-Key": API_KEY},
    }


def auth_env(public_key: Path) -> dict[str, str]:
    return {
        "VANNAH_AUTHENTICATION_ENABLED": "true",
        "VANNAH_JWT_HS256_SECRET": HS_SECRET,
        "VANNAH_JWT_PUBLIC_KEY_FILE": str(public_key),
        "VANNAH_JWT_ISSUER": ISSUER,
        "VANNAH_JWT_AUDIENCE": AUDIENCE,
        "VANNAH_REGISTERED_USERS": json.dumps({USER: PASSWORD}),
        "VANNAH_API_KEYS": json.dumps({"bench": {"key": API_KEY, "roles": ["read"]}}),
    }


def start_service(
    data_dir: Path, log_path: Path, extra: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "VANNAH_DATA_DIR": str(data_dir),
        "VANNAH_DICOMWEB_PORT": str(port),
        "PYTHONPATH": str(REPO_ROOT),
        **extra,
    }
    env.pop("VANNAH_CONFIG", None)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomweb"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for_port(port, proc)
    return proc, port


def in_process_cost(settings: Settings, creds: dict[str, dict[str, str]]) -> dict[str, float]:
    """Microseconds per ``Authenticator.from_http`` call, per credential kind."""
    authenticator = Authenticator(settings)
    cost: dict[str, float] = {}
    for mode, headers in creds.items():
        if mode == "off":
            continue
        authorization, api_key = headers.get("Authorization"), headers.get("X-API-Key")
        authenticator.from_http(authorization, api_key)  # warm (key parsing, caches)
        timer = timeit.Timer(lambda a=authorization, k=api_key: authenticator.from_http(a, k))
        number, _ = timer.autorange()
        best = min(timer.repeat(repeat=5, number=number)) / number
        cost[mode] = best * 1e6
    return cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--per-study", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    install_signal_handlers()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with run_dir("auth-cost") as work:
        data_dir = work / "data"
        log(f"building {args.studies} studies x {args.per_study} instances in {data_dir}")
        uids = build_archive(data_dir, args.studies, args.per_study)
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_key = work / "rs256.pub.pem"
        public_key.write_bytes(
            rsa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        creds = credentials(rsa_key)
        procs = []
        try:
            off_proc, off_port = start_service(data_dir, work / "off.log", {})
            procs.append(off_proc)
            on_proc, on_port = start_service(data_dir, work / "on.log", auth_env(public_key))
            procs.append(on_proc)
            clients = {m: HttpClient(off_port if m == "off" else on_port) for m in MODES}
            study, series, sop = uids[len(uids) // 2]
            requests = {
                "QIDO-RS /studies?limit=25": ("/dicom-web/studies?limit=25", {}),
                "WADO-RS study metadata": (f"/dicom-web/studies/{study}/metadata", {}),
                "WADO-RS instance": (
                    f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
                    {"Accept": MULTIPART_DICOM},
                ),
            }
            sides = {(r, m): Side() for r in requests for m in MODES}
            total = args.warmup + args.rounds
            secured = MODES[1:]
            for round_no in range(total):
                turn = round_no % len(secured)
                # Every request goes to the other process than the one before (off, hs256,
                # off, rs256, ...), so neither is kept warmer by answering several in a row.
                order = [m for on in secured[turn:] + secured[:turn] for m in ("off", on)]
                for name, (path, extra) in requests.items():
                    for mode in order:
                        result = clients[mode].get(path, {**extra, **creds[mode]})
                        if result.status != 200:
                            raise RuntimeError(f"{mode} {name}: HTTP {result.status}")
                        if round_no >= args.warmup:
                            sides[(name, mode)].times_ms.append(result.seconds * 1000)
            for client in clients.values():
                client.close()
        finally:
            for proc in procs:
                kill_group(proc)
        settings = load_settings(
            data_dir=data_dir,
            authentication_enabled=True,
            jwt_hs256_secret=HS_SECRET,
            jwt_public_key_file=public_key,
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
            registered_users={USER: PASSWORD},
            api_keys={"bench": {"key": API_KEY, "roles": ["read"]}},
        )
        micro = in_process_cost(settings, creds)
    rows = []
    for name in requests:
        base = sides[(name, "off")].p(0.5)
        cheapest = sides[(name, "api-key")].p(0.5)
        for mode in MODES:
            side = sides[(name, mode)]
            added = "-" if mode == "off" else f"{side.p(0.5) - base:+.2f}"
            within = "-" if mode in ("off", "api-key") else f"{side.p(0.5) - cheapest:+.2f}"
            rows.append(
                [
                    name,
                    mode,
                    f"{side.p(0.5):.2f}",
                    f"{side.p(0.95):.2f}",
                    f"{min(side.times_ms):.2f}-{max(side.times_ms):.1f}",
                    added,
                    within,
                ]
            )
    print_table(
        f"Authentication cost, {args.rounds} interleaved rounds ({args.warmup} warm-up), "
        f"{args.studies} studies x {args.per_study} instances",
        ("request", "mode", "p50 ms", "p95 ms", "min-max ms", "p50 added ms", "vs API key ms"),
        rows,
    )
    print_table(
        "Authenticator.from_http in process (best of 5)",
        ("credential", "us per call"),
        [[mode, f"{us:.1f}"] for mode, us in micro.items()],
    )
    if args.json:
        out = {
            "rounds": args.rounds,
            "warmup": args.warmup,
            "studies": args.studies,
            "per_study": args.per_study,
            "http": {f"{r} | {m}": s.as_dict() for (r, m), s in sides.items()},
            "in_process_us": micro,
        }
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
