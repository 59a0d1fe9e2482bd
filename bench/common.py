"""Shared benchmark helpers: synthetic data, Orthanc and receiver launchers, storescu, stats.

Everything scratch lives under ``bench/out/`` (gitignored). Servers run in their own process
groups and are always killed on exit, including on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
DATA_DIR = OUT_DIR / "data"
RUNS_DIR = OUT_DIR / "runs"

ORTHANC_BIN = "/usr/sbin/Orthanc"
ORTHANC_AET = "ORTHANC"
RECEIVER_AET = "VANNAHCLOUD"
CALLING_AET = "BENCHSCU"

# Debian's DCMTK and Orthanc leave Nagle on unless this is in their environment (BASELINES.md).
NODELAY_ENV = {"TCP_NODELAY": "1"}

Kind = Literal["ct", "tiny"]


# --------------------------------------------------------------------------- signals


def install_signal_handlers() -> None:
    """Turn SIGINT/SIGTERM/SIGHUP into KeyboardInterrupt so every ``finally`` cleanup runs.

    SIGINT is reset too, since a shell starts background jobs with it ignored.
    """

    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM/SIGHUP until the block ends, so cleanup cannot be cut short."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class DataSet:
    """A cached set of synthetic Part-10 files."""

    name: str
    folder: Path
    files: tuple[Path, ...]

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    @property
    def mean_bytes(self) -> float:
        return self.total_bytes / len(self.files) if self.files else 0.0

    def split(self, parts: int) -> list[Path]:
        """Return `parts` folders of hard links that share the files round-robin (cached).

        storescu gets one folder each (``+sd``), which keeps command lines short for big sets.
        """
        root = self.folder / f"split-{parts}"
        marker = root / ".complete"
        folders = [root / f"part-{i}" for i in range(parts)]
        if marker.exists():
            return folders
        shutil.rmtree(root, ignore_errors=True)
        for folder in folders:
            folder.mkdir(parents=True)
        for i, path in enumerate(self.files):
            (folders[i % parts] / path.name).hardlink_to(path)
        marker.touch()
        return folders


def synthetic_set(count: int, kind: Kind = "ct", *, per_series: int = 100) -> DataSet:
    """Return `count` synthetic instances of one study, generating them once into bench/out/.

    ``ct``: 512x512 16-bit CT, explicit VR LE, about 0.5 MB each.
    ``tiny``: the same CT header with 64x64 pixels, about 10 KB each (header-heavy tests).
    Instances are grouped `per_series` to a series. The set is keyed by its parameters.
    """
    from pydicom.uid import generate_uid  # imported lazily: only generation needs pydicom

    from vannah_pipelines.dicom.synthetic import make_instance, to_part10

    name = f"{kind}-{count}-s{per_series}"
    folder = DATA_DIR / name
    files_dir = folder / "files"
    marker = folder / ".complete"
    if marker.exists():
        return DataSet(name, folder, tuple(sorted(files_dir.iterdir())))
    shutil.rmtree(folder, ignore_errors=True)
    for stale in DATA_DIR.glob(f".tmp-{name}-*"):  # left by an interrupted generation
        shutil.rmtree(stale, ignore_errors=True)
    tmp = DATA_DIR / f".tmp-{name}-{os.getpid()}"
    (tmp / "files").mkdir(parents=True)
    size = 64 if kind == "tiny" else None
    study_uid = generate_uid()
    series_uid = ""
    started = time.monotonic()
    for i in range(count):
        if i % per_series == 0:
            series_uid = generate_uid()
        ds = make_instance(
            "CT",
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=f"VHC-BENCH-{kind.upper()}-{count}",
            patient_name="Bench^Synthetic",
            series_number=i // per_series + 1,
            instance_number=i % per_series + 1,
            rows=size,
            columns=size,
        )
        # Name by position so storescu sends in a stable order.
        (tmp / "files" / f"{i:07d}.dcm").write_bytes(to_part10(ds))
    (tmp / ".complete").touch()
    tmp.rename(folder)
    print(
        f"generated {count} {kind} instances in {time.monotonic() - started:.1f} s -> {folder}",
        file=sys.stderr,
    )
    return DataSet(name, folder, tuple(sorted(files_dir.iterdir())))


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """Return a TCP port that is free on all addresses right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait until 127.0.0.1:`port` accepts TCP connections; fail if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open within {timeout:.0f} s")


def kill_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop `proc` and its whole process group: SIGTERM, then SIGKILL after `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # Children may outlive the leader; make sure the group is gone.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def _process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from the ppid field of /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the ")" that closes the command name.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler:
    """Sample the summed RSS of a process tree every `interval` seconds; keep the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        total = sum(_rss_bytes(pid) for pid in _process_tree(self.pid))
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def reset(self) -> None:
        self.peak_bytes = 0

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Server:
    """A DICOM server under test, in its own process group and scratch folder."""

    label: str = "server"
    aet: str = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dicom_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.memory: MemorySampler | None = None
        self._log: IO[bytes] | None = None

    # subclasses: command, environment, readiness, instance count
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return {**os.environ, **NODELAY_ENV}

    def _wait_ready(self) -> None:
        assert self.proc is not None
        wait_for_port(self.dicom_port, self.proc)

    def stored_instances(self) -> int:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def start(self) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self._command(),
            cwd=self.workdir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killed as a whole, immune to Ctrl-C
        )
        try:
            self._wait_ready()
        except BaseException as exc:
            self.stop()
            if isinstance(exc, Exception):
                raise RuntimeError(f"{self.label} failed to start:\n{self.log_tail()}") from exc
            raise
        self.memory = MemorySampler(self.proc.pid).start()
        return self

    def stop(self) -> None:
        with signals_deferred():
            if self.memory is not None:
                self.memory.stop()
            if self.proc is not None:
                kill_group(self.proc)
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dicomweb_plugin_path() -> Path:
    """Path of libOrthancDicomWeb.so as ``dpkg -L orthanc-dicomweb`` lists it."""
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError("orthanc-dicomweb is not installed: run .ci/bootstrap --bench") from exc
    for line in listing.splitlines():
        if line.endswith("libOrthancDicomWeb.so") and Path(line).is_file():
            return Path(line)
    raise RuntimeError("libOrthancDicomWeb.so not found in dpkg -L orthanc-dicomweb")


class OrthancServer(Server):
    """Debian's Orthanc with the reference configuration of BASELINES.md, on fresh storage."""

    label = "orthanc"
    aet = ORTHANC_AET

    def __init__(
        self,
        workdir: Path,
        *,
        dicomweb: bool = False,
        extra_config: dict[str, object] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.dicomweb = dicomweb
        self.extra_config = extra_config or {}  # merged over the reference configuration
        self.http_port = 0

    def config(self) -> dict[str, object]:
        config: dict[str, object] = {
            "Name": "VannahBenchOrthanc",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),  # default SQLite index
            "StorageCompression": False,
            "SyncStorageArea": True,
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "TcpNoDelay": True,
            "KeepAlive": True,
            "SaveJobs": False,
            "StorageAccessOnFind": "Always",
            "RemoteAccessAllowed": False,  # it listens on all addresses; no bind option
            "AuthenticationEnabled": False,
            "Plugins": [],
        }
        if self.dicomweb:
            config["Plugins"] = [str(dicomweb_plugin_path())]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        config.update(self.extra_config)
        return config

    def _command(self) -> list[str]:
        if not Path(ORTHANC_BIN).exists():
            raise RuntimeError(f"{ORTHANC_BIN} missing: run .ci/bootstrap --bench")
        self.dicom_port, self.http_port = free_port(), free_port()
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        return [ORTHANC_BIN, str(path)]

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}")
            with contextlib.suppress(OSError, ValueError):
                self.rest("/system")
                wait_for_port(self.dicom_port, self.proc, timeout=5)
                return
            time.sleep(0.1)
        raise TimeoutError("Orthanc REST /system did not answer within 30 s")

    def rest(self, path: str) -> object:
        """GET a REST resource and decode its JSON."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def stored_instances(self) -> int:
        stats = self.rest("/statistics")
        assert isinstance(stats, dict)
        return int(stats["CountInstances"])


class ReceiverServer(Server):
    """Our DIMSE receiver: ``python -m receiver`` with VANNAH_* settings from the environment."""

    label = "vannah"
    aet = RECEIVER_AET

    def __init__(self, workdir: Path, *, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(workdir)
        self.extra_env = extra_env or {}

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def _command(self) -> list[str]:
        self.dicom_port = free_port()
        return [sys.executable, "-m", "receiver"]

    def _env(self) -> dict[str, str]:
        env = {
            **super()._env(),
            "VANNAH_DATA_DIR": str(self.data_dir),
            "VANNAH_DICOM_PORT": str(self.dicom_port),
            "VANNAH_DICOM_AET": RECEIVER_AET,
            **self.extra_env,
        }
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        return env

    def start(self) -> Server:
        if not (REPO_ROOT / "receiver" / "__main__.py").exists():
            raise RuntimeError("receiver/__main__.py does not exist yet (python -m receiver)")
        return super().start()

    def stored_instances(self) -> int:
        """Landed Part-10 files (open and sealed batches; temp files excluded)."""
        landing = self.data_dir / "landing"
        if not landing.exists():
            return 0
        return sum(1 for p in landing.rglob("*.dcm") if not p.name.startswith(".tmp-"))


def make_server(
    target: str,
    workdir: Path,
    *,
    dicomweb: bool = False,
    receiver_env: dict[str, str] | None = None,
    tls: TlsFiles | None = None,
) -> Server:
    """Build the server for `target` ("orthanc" or "vannah") in `workdir`.

    `dicomweb` loads Orthanc's DICOMweb plugin; `receiver_env` adds VANNAH_* settings;
    `tls` turns DICOM TLS on, with the same keys and the same files for both.
    """
    if target == "orthanc":
        return OrthancServer(
            workdir, dicomweb=dicomweb, extra_config=tls.orthanc_keys() if tls else None
        )
    if target == "vannah":
        env = {**(receiver_env or {}), **(tls.receiver_env() if tls else {})}
        return ReceiverServer(workdir, extra_env=env)
    raise ValueError(f"unknown target {target!r}")


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate (Orthanc's and the receiver's) and a client one
    (storescu's), made with openssl; the CA is the trusted bundle on both sides."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, folder: Path) -> TlsFiles:
        folder.mkdir(parents=True, exist_ok=True)
        files = cls(*(folder / f"{n}.pem" for n in ("ca", "server", "server-key", "client")),
                    folder / "client-key.pem")  # fmt: skip
        ca_key = folder / "ca-key.pem"
        curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        subprocess.run(
            ["openssl", "req", "-x509", *curve, "-keyout", str(ca_key), "-out", str(files.ca),
             "-days", "2", "-subj", "/CN=vannah bench CA"],
            check=True, capture_output=True,
        )  # fmt: skip
        for cert, key, cn in (
            (files.server_cert, files.server_key, "localhost"),
            (files.client_cert, files.client_key, "bench storescu"),
        ):
            csr = folder / f"{cert.stem}.csr"
            subprocess.run(
                ["openssl", "req", "-new", *curve, "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={cn}"],
                check=True, capture_output=True,
            )  # fmt: skip
            subprocess.run(
                ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(files.ca),
                 "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2", "-out", str(cert)],
                check=True, capture_output=True,
            )  # fmt: skip
        return files

    def storescu_args(self) -> list[str]:
        return ["+tls", str(self.client_key), str(self.client_cert), "+cf", str(self.ca)]

    def orthanc_keys(self) -> dict[str, object]:
        return {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(self.server_cert),
            "DicomTlsPrivateKey": str(self.server_key),
            "DicomTlsTrustedCertificates": str(self.ca),
            "DicomTlsRemoteCertificateRequired": True,
        }

    def receiver_env(self) -> dict[str, str]:
        return {
            "VANNAH_DICOM_TLS_ENABLED": "true",
            "VANNAH_DICOM_TLS_CERTIFICATE": str(self.server_cert),
            "VANNAH_DICOM_TLS_PRIVATE_KEY": str(self.server_key),
            "VANNAH_DICOM_TLS_TRUSTED_CERTIFICATES": str(self.ca),
            "VANNAH_DICOM_TLS_REMOTE_CERTIFICATE_REQUIRED": "true",
        }


@contextlib.contextmanager
def run_dir(prefix: str) -> Iterator[Path]:
    """A fresh scratch folder under bench/out/runs/, removed afterwards (set
    VANNAH_BENCH_KEEP=1 to keep it for inspection)."""
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=RUNS_DIR))
    try:
        yield path
    finally:
        if os.environ.get("VANNAH_BENCH_KEEP") != "1":
            with signals_deferred():
                shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- storescu


@dataclass(frozen=True)
class StoreResult:
    """Outcome of sending a data set over K parallel associations."""

    instances: int
    total_bytes: int
    associations: int
    seconds: float

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / 1e6 / self.seconds


class StoreFailedError(RuntimeError):
    """A storescu process failed or reported an unsuccessful C-STORE."""


def run_storescu(
    data: DataSet,
    *,
    port: int,
    called_aet: str,
    associations: int = 1,
    host: str = "127.0.0.1",
    logdir: Path | None = None,
    timeout: float = 1800.0,
    tls: TlsFiles | None = None,
) -> StoreResult:
    """Send `data` with `associations` storescu processes at once; return the wall time.
    With `tls`, over DICOM TLS (``+tls`` with the client certificate, ``+cf`` the CA).

    The files are shared round-robin into one folder per association (``+sd``). The clock
    runs from starting the first process until the last one exits. Any non-zero exit code
    or ``E:`` line on stderr raises :class:`StoreFailedError`.
    """
    folders = data.split(associations)
    env = {**os.environ, **NODELAY_ENV}
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        # Output goes to temp files, not pipes: a chatty storescu can never block on a pipe.
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in folders]
        try:
            started = time.perf_counter()
            for folder, log in zip(folders, logs, strict=True):
                cmd = [
                    "storescu",
                    "-aet", CALLING_AET,
                    "-aec", called_aet,
                    "+sd",
                    *(tls.storescu_args() if tls is not None else []),
                    host, str(port), str(folder),
                ]  # fmt: skip
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            deadline = time.monotonic() + timeout
            for proc in procs:
                proc.wait(max(0.0, deadline - time.monotonic()))
            seconds = time.perf_counter() - started
        finally:
            with signals_deferred():
                for proc in procs:
                    kill_group(proc, timeout=2)
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read().decode(errors="replace"))
    errors: list[str] = []
    for i, (proc, text) in enumerate(zip(procs, texts, strict=True)):
        if logdir is not None:
            (logdir / f"storescu-{associations}x-{i}.log").write_text(text)
        bad = [line for line in text.splitlines() if line.startswith(("E:", "F:"))]
        if proc.returncode != 0 or bad:
            errors.append(f"storescu #{i} exit {proc.returncode}: " + "; ".join(bad[:3]))
    if errors:
        raise StoreFailedError("\n".join(errors))
    return StoreResult(len(data.files), data.total_bytes, associations, seconds)


# --------------------------------------------------------------------------- stats


@dataclass
class Series:
    """Repeated measurements of one figure."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def summary(self, fmt: str = ".0f", suffix: str = "") -> str:
        """``median<suffix> (min-max)``, or just the value when measured once."""
        if not self.values:
            return "-"
        if len(self.values) == 1:
            return f"{self.values[0]:{fmt}}{suffix}"
        return f"{self.median:{fmt}}{suffix} ({self.min:{fmt}}-{self.max:{fmt}})"

    def as_dict(self) -> dict[str, float | list[float]]:
        if not self.values:
            return {"values": []}
        return {"median": self.median, "min": self.min, "max": self.max, "values": self.values}


def format_ratio(ours: float, reference: float) -> str:
    """``1.23x`` (ours divided by the reference)."""
    if reference <= 0:
        return "-"
    return f"{ours / reference:.2f}x"


def format_mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.0f} MiB"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a GitHub markdown table with padded columns."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print(f"\n### {title}\n")
    print(markdown_table(header, rows))


# --------------------------------------------------------------------------- DICOMweb


class DicomWebServer(Server):
    """Our DICOMweb service, ``python -m dicomweb``, serving the data folder `data_dir`.

    The service loads the whole catalog before it opens its port, so ``ready_seconds`` (from
    spawning the process to the port accepting connections) is its startup and load time.
    """

    label = "vannah-dicomweb"

    def __init__(
        self,
        workdir: Path,
        data_dir: Path,
        *,
        extra_env: dict[str, str] | None = None,
        load_timeout: float = 900.0,
    ) -> None:
        super().__init__(workdir)
        self.data_dir = data_dir
        self.extra_env = extra_env or {}
        self.load_timeout = load_timeout
        self.http_port = 0
        self.ready_seconds = 0.0
        self._spawned = 0.0

    def _command(self) -> list[str]:
        if not (REPO_ROOT / "dicomweb" / "__main__.py").exists():
            raise RuntimeError("dicomweb/__main__.py does not exist (python -m dicomweb)")
        self.http_port = free_port()
        self._spawned = time.monotonic()
        return [sys.executable, "-m", "dicomweb"]

    def _env(self) -> dict[str, str]:
        env = {
            **super()._env(),
            "VANNAH_DATA_DIR": str(self.data_dir),
            "VANNAH_DICOMWEB_PORT": str(self.http_port),
            **self.extra_env,
        }
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        return env

    def _wait_ready(self) -> None:
        assert self.proc is not None
        wait_for_port(self.http_port, self.proc, timeout=self.load_timeout)
        self.ready_seconds = time.monotonic() - self._spawned

    def stored_instances(self) -> int:
        raise NotImplementedError("ask the catalog")


@dataclass(frozen=True)
class HttpResult:
    """One timed HTTP exchange: status, headers, body size and wall time to the last byte."""

    status: int
    headers: dict[str, str]
    nbytes: int
    seconds: float
    body: bytes | None  # kept only when asked for


class HttpClient:
    """A keep-alive HTTP/1.1 client to 127.0.0.1:`port` that times whole exchanges.

    The clock runs from sending the request to reading the last byte of the body.
    """

    def __init__(self, port: int, timeout: float = 600.0) -> None:
        import http.client

        self._factory = lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self._conn = self._factory()

    def get(
        self,
        path: str,
        headers: dict[str, str] | None = None,
        *,
        keep_body: bool = True,
        on_chunk: object = None,
        on_response: object = None,
        chunk_size: int = 1 << 20,
    ) -> HttpResult:
        """GET `path`; `on_response(response)` sees the status and headers before the body,
        `on_chunk(bytes)` sees the body as it streams when not keeping it."""
        for attempt in (0, 1):
            try:
                started = time.perf_counter()
                self._conn.request("GET", path, headers=headers or {})
                response = self._conn.getresponse()
                break
            except (ConnectionError, OSError):
                self._conn.close()
                self._conn = self._factory()  # the server closed an idle keep-alive connection
                if attempt:
                    raise
        if callable(on_response):
            on_response(response)
        if keep_body:
            body: bytes | None = response.read()
            nbytes = len(body or b"")
        else:
            body, nbytes = None, 0
            while chunk := response.read(chunk_size):
                nbytes += len(chunk)
                if callable(on_chunk):
                    on_chunk(chunk)
        seconds = time.perf_counter() - started
        return HttpResult(
            response.status, {k.lower(): v for k, v in response.getheaders()}, nbytes, seconds, body
        )

    def close(self) -> None:
        self._conn.close()


def quantile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def peak_rss_reset(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of `pid`; False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(pid: int) -> int:
    """The kernel's peak RSS (VmHWM) of `pid` since start or the last reset."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Side:
    """What one server answered to one query kind (through one client): per-request
    latencies, the number of answers, their UIDs when compared, and any errors."""

    times_ms: list[float] = field(default_factory=list)
    count: int | None = None
    uids: set[str] | None = None
    errors: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        return quantile(self.times_ms, q) if self.times_ms else float("nan")

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"count": self.count, "errors": self.errors[:5]}
        if self.times_ms:
            out.update(
                p50_ms=self.p(0.5),
                p95_ms=self.p(0.95),
                min_ms=min(self.times_ms),
                max_ms=max(self.times_ms),
                times_ms=self.times_ms,
            )
        return out


def ms(value: float) -> str:
    """Milliseconds for a table: one decimal below 100."""
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def mib(value: object) -> str:
    """Bytes as MiB for a table ("-" when not measured)."""
    return f"{float(str(value)) / 2**20:.0f} MiB" if value else "-"


LATENCY_HEADER = (
    "ours p50 ms",
    "ours p95 ms",
    "ours min-max",
    "Orthanc p50 ms",
    "Orthanc p95 ms",
    "Orthanc min-max",
    "p50 ours/Orthanc",
    "p95 ours/Orthanc",
)


def latency_cells(ours: Side, ref: Side | None) -> list[str]:
    """Table cells under LATENCY_HEADER: our p50, p95 and min-max, then the reference's
    and the p50 / p95 ratios ("failed" / "not measured" where there are no timings)."""
    cells = (
        [ms(ours.p(0.5)), ms(ours.p(0.95)), f"{ms(min(ours.times_ms))}-{ms(max(ours.times_ms))}"]
        if ours.times_ms
        else ["failed", "-", "-"]
    )
    if ref is None or not ref.times_ms:
        return [*cells, "not measured", "-", "-", "-", "-"]
    return [
        *cells,
        ms(ref.p(0.5)),
        ms(ref.p(0.95)),
        f"{ms(min(ref.times_ms))}-{ms(max(ref.times_ms))}",
        format_ratio(ours.p(0.5), ref.p(0.5)) if ours.times_ms else "-",
        format_ratio(ours.p(0.95), ref.p(0.95)) if ours.times_ms else "-",
    ]


LABELS = {"vannah": "Vannah", "orthanc": "Orthanc"}


def log(message: str) -> None:
    """Progress to stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def niced(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run a data-preparation command at low priority (the machine is shared)."""
    log("  $ " + " ".join(cmd))
    subprocess.run(
        ["nice", "-n", "10", *cmd], check=True, cwd=REPO_ROOT, env=env, stdout=sys.stderr
    )


def vannah_import(data_dir: Path, folder: Path) -> None:
    """Load `folder` into our data folder the real way: `vannah import --ingest`."""
    niced(
        [
            sys.executable,
            "-m",
            "vannah_pipelines.cli",
            "--data-dir",
            str(data_dir),
            "import",
            "-q",
            "--ingest",
            str(folder),
        ]
    )
