"""The DIMSE SCP: an AE factory, and a supervisor running worker processes on one port.

pynetdicom in one process is GIL-bound, so ``settings.receiver_workers`` processes each bind
their own listening socket to the same port with ``SO_REUSEPORT`` and the kernel spreads
associations over them. The parent holds the port (bound, not listening), seals batches
stranded by a dead writer, restarts a worker that dies, and forwards SIGTERM/SIGINT.
Workers die with the parent (``PR_SET_PDEATHSIG`` plus a parent-pid watch).
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import AE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from receiver import retrieve
from receiver.archive import Archive
from receiver.commitment import Commitments
from receiver.contexts import supported_contexts
from receiver.fast_store import FastStore, Proposal
from receiver.gate import Gate
from receiver.guarded_socket import GuardedSocket
from receiver.handlers import AssociationLog, Landing, event_handlers
from receiver.limits import Limits, PendingConnections
from vannah_pipelines.landing.layout import LandingZone, write_atomic
from vannah_pipelines.security.audit import AuditLog
from vannah_pipelines.security.peers import Admission
from vannah_pipelines.settings import Settings
from vannah_pipelines.stop_flag import StopFlag

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s: %(message)s"
DRAIN_SECONDS = 5.0  # a stopping worker lets running associations finish this long
WORKER_STOP_SECONDS = 20.0  # then the parent kills it
READY_SECONDS = 60.0
GC_IDLE_SECONDS = 1.0  # a server idle this long may run its full garbage collection
_PR_SET_PDEATHSIG = 1


class ReceiverError(RuntimeError):
    """The receiver could not start (port taken, workers failing at start)."""


def configure_logging(level: int | str = logging.INFO) -> None:
    """Log to stderr with the process name and pid; pynetdicom at WARNING, pydicom at
    ERROR (no patient data at INFO or above)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom's validation warnings quote element values (names, dates of birth).
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def build_ae(settings: Settings) -> AE:
    """Return the receiver's AE: Verification, every storage SOP class (role selection
    accepted, for C-GET), Patient/Study Root Q/R FIND, MOVE and GET; any called AE."""
    ae = AE(ae_title=settings.dicom_aet)
    retrieve.install()
    for cx in supported_contexts():
        if cx.accepts_role_selection:
            ae.add_supported_context(
                cx.abstract_syntax, list(cx.transfer_syntaxes), scu_role=True, scp_role=True
            )
        else:
            ae.add_supported_context(cx.abstract_syntax, list(cx.transfer_syntaxes))
    ae.maximum_associations = settings.max_associations
    # Larger P-DATA PDUs from peers cost fewer round trips; a longer one is aborted.
    ae.maximum_pdu_size = settings.dimse_max_pdu_bytes
    ae.require_called_aet = False  # logged by the handlers instead
    ae.require_calling_aet = []
    return ae


class RunningAssociation(Protocol):
    """What the worker's drain needs of an association, pynetdicom's or the fast path's."""

    def abort(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


class ReusePortAssociationServer(ThreadedAssociationServer):
    """A threaded association server sharing its port (``SO_REUSEPORT``) with the other
    workers, with Nagle off on every accepted socket.

    With :attr:`fast_store` set, each connection's thread first peeks at the
    A-ASSOCIATE-RQ: a storage/verification/C-FIND-only association is served by the fast
    path (``receiver.fast_store``), anything else by pynetdicom as usual.
    """

    daemon_threads = True
    block_on_close = False  # the worker drains associations itself
    fast_store: FastStore | None = None
    limits: Limits | None = None  # None: pynetdicom reads the accepted socket unguarded
    pending: PendingConnections | None = None
    gate: Gate | None = None  # TLS and admission; None: every connection as it comes
    idle_seconds: float = 60.0  # pynetdicom's network timeout
    last_connection: float = 0.0  # time.monotonic() of the last connection accepted

    def service_actions(self) -> None:
        """pynetdicom's server runs a full ``gc.collect()`` every 60 turns of its accept loop
        (each connection, each poll interval) to free ended associations. With the catalog
        stack loaded it holds the GIL for 15-30 ms, in the middle of whatever association
        runs then (one C-FIND in 60 paid it). Here it runs only once the server is idle
        (nothing running, no connection for GC_IDLE_SECONDS); Python's own collector runs
        as usual meanwhile."""
        turns = self._gc
        turns[0] = min(turns[0] + 1, turns[1])
        if (
            turns[0] >= turns[1]
            and time.monotonic() - self.last_connection > GC_IDLE_SECONDS
            and not self.running_associations()
        ):
            gc.collect()
            turns[0] = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection on a thread of its own, unless too many connections have
        not sent their A-ASSOCIATE-RQ yet: then close it at once."""
        self.last_connection = time.monotonic()
        release = self.pending.admit() if self.pending is not None else _nothing
        if release is None:
            assert self.pending is not None
            log.warning(
                "closed a connection from %s: %d connections have not associated yet",
                client_address[0] if isinstance(client_address, tuple) else client_address,
                self.pending.count,
            )
            self.shutdown_request(request)
            return
        # The low-level start: threading.Thread.start() waits until the new thread runs,
        # a GIL round trip on every association; this returns at once and the accept loop
        # goes back to select(), which lets the new thread run.
        try:
            _thread.start_new_thread(self._serve_connection, (request, client_address, release))
        except BaseException:
            release()
            self.shutdown_request(request)
            raise

    def _serve_connection(
        self, request: Any, client_address: Any, release: Callable[[], None]
    ) -> None:
        # As ThreadedAssociationServer.process_request_thread: pynetdicom's handler returns
        # once its association thread runs, which then owns the socket.
        try:
            self._serve(request, client_address, release)
        except Exception:
            release()
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def _serve(self, request: Any, client_address: Any, release: Callable[[], None]) -> None:
        """TLS handshake and admission (``receiver.gate``), then the fast path or
        pynetdicom; `release` once the A-ASSOCIATE-RQ has arrived (or the connection is
        closed without one): a handshake in progress counts as a pending connection."""
        sock: Any = request
        gate = self.gate
        prefix = b""
        admission: Admission | None = None
        proposal: Proposal | None = None
        if gate is not None and gate.tls is not None:
            sock = gate.handshake(request, client_address)
            if sock is None:
                release()
                return
        if gate is not None and gate.reads_request:
            read = gate.read_request(sock)
            release()
            if read is None:  # closed or silent before its A-ASSOCIATE-RQ
                gate.abort(sock)
                return
            if read.primitive is None and gate.policy.active:
                gate.abort(sock)  # nothing to admit: pynetdicom could not decode it either
                return
            prefix = read.data
            if read.primitive is not None:
                admission = gate.admit(sock, read.primitive, client_address)
                if admission is None:
                    return  # rejected (A-ASSOCIATE-RJ sent)
                if self.fast_store is not None:
                    proposal = self.fast_store.decide(read.data, consumed=True, admission=admission)
        pynetdicom_socket: Any = sock
        if self.limits is not None:
            pynetdicom_socket = GuardedSocket(
                sock,
                self.limits,
                peer=f"{client_address[0]}:{client_address[1]}",
                idle_seconds=self.idle_seconds,
                release_pending=release,
                prefix=prefix,
                admission=admission,
            )
        else:
            release()  # not followed: only the ACSE timeout bounds it

        def hand_off() -> None:
            ThreadedAssociationServer.finish_request(self, pynetdicom_socket, client_address)

        fast_store = self.fast_store
        if fast_store is None or (prefix and proposal is None):
            hand_off()
            return
        fast_store.serve(
            sock,
            client_address,
            others=lambda: len(self.active_associations),
            hand_off=hand_off,
            arrived=release,
            proposal=proposal,
        )

    def running_associations(self) -> list[RunningAssociation]:
        """Every association in progress on this server, on either path."""
        running: list[RunningAssociation] = list(self.active_associations)
        if self.fast_store is not None:
            running.extend(self.fast_store.running())
        return running

    def server_bind(self) -> None:
        sock = self.socket
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (running associations go on)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def _nothing() -> None:
    return None


class SharedContexts(list[PresentationContext]):
    """The server's supported presentation contexts, shared by its associations.

    pynetdicom gives each association a ``deepcopy`` of them: with every storage SOP class
    that is 178 contexts and 2,744 transfer syntaxes, about 10 ms of each association's
    negotiation. Nothing changes them once the server runs (negotiation builds new result
    contexts, as the fast path does from the same list), so each association gets this
    list's items, not copies.
    """

    def __deepcopy__(self, memo: dict[int, object]) -> list[PresentationContext]:
        return list(self)


def build_server(
    ae: AE,
    settings: Settings,
    address: tuple[str, int],
    landing: Landing,
    associations: AssociationLog,
    archive: Archive | None = None,
) -> ReusePortAssociationServer:
    """A worker's association server on `address` (not yet serving): pynetdicom with the
    handler table, plus the storage fast path unless ``settings.receiver_fast_store`` is off."""
    handlers = event_handlers(landing, associations, archive)
    if archive is not None:
        handlers.extend(Commitments(archive, associations).handlers())
    server = ae.make_server(
        address,
        evt_handlers=handlers,
        server_class=ReusePortAssociationServer,
    )
    assert isinstance(server, ReusePortAssociationServer)
    server.contexts = SharedContexts(server.contexts)
    limits = Limits.from_settings(settings)
    server.limits = limits
    server.pending = PendingConnections(limits.max_pending_connections)
    server.idle_seconds = float(ae.network_timeout or 60)
    server.gate = Gate.from_settings(
        settings, limits, acse_timeout=float(ae.acse_timeout or 30), audit=associations.audit
    )
    if settings.receiver_fast_store:
        server.fast_store = FastStore(
            ae, server.ae_title, server.contexts, landing, associations, limits, archive
        )
    return server


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a ``SO_REUSEPORT`` socket to hold `port`; 0 picks a free one.

    Raises
    ------
    ReceiverError
        If the port is in use by a socket that does not share it, or a server already
        listens on it: another receiver of the same user could share the port
        (``SO_REUSEPORT``) and the kernel would give it half the associations.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port and _listening(host, port, family):
        raise ReceiverError(
            f"cannot bind {host}:{port}: a server already listens there (another receiver?)"
        )
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ReceiverError(f"cannot bind {host}:{port}: {exc}") from exc
    return sock


def _listening(host: str, port: int, family: socket.AddressFamily) -> bool:
    """Whether something accepts connections on `port` (of `host`, or of loopback when
    `host` is a wildcard)."""
    target = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((target, port)) == 0


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM when the parent dies; exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _run_worker(
    settings: Settings,
    port: int,
    index: int,
    ready: multiprocessing.Queue[tuple[int, int]],
    parent_pid: int,
    log_level: int,
) -> None:
    """One worker process: serve associations until SIGTERM/SIGINT or the parent's death."""
    _die_with_parent(parent_pid)
    configure_logging(log_level)
    stop = StopFlag()
    stop.install(signal.SIGTERM, signal.SIGINT)

    landing = Landing.from_settings(settings)
    associations = AssociationLog(AuditLog(settings.audit_dir, "receiver"))
    archive = Archive(settings)
    ae = build_ae(settings)
    server = build_server(
        ae, settings, (settings.dicom_bind_host, port), landing, associations, archive
    )
    acceptor = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.25}, name="accept", daemon=True
    )
    acceptor.start()
    ready.put((index, os.getpid()))
    log.info("worker %d accepting on %s:%d", index, settings.dicom_bind_host, port)
    while not stop.wait(0.5, poll=0.5):
        if os.getppid() != parent_pid:
            log.warning("supervisor died; worker %d stopping", index)
            break
    server.shutdown()
    _drain(server)
    landing.close()
    ae.shutdown()
    archive.close()
    log.info("worker %d stopped", index)


def _drain(server: ReusePortAssociationServer) -> None:
    """Let running associations (both paths) finish for a while, then abort them."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while server.running_associations() and time.monotonic() < deadline:
        time.sleep(0.05)
    remaining = server.running_associations()
    for assoc in remaining:
        log.warning("aborting an association still running at shutdown")
        with contextlib.suppress(Exception):
            assoc.abort()
    for assoc in remaining:
        assoc.join(timeout=2)


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    restart_at: float = 0.0
    backoff: float = 0.5


@dataclass
class Receiver:
    """The supervisor: reserves the port, runs and restarts the workers, stops them cleanly."""

    settings: Settings
    port_file: Path | None = None
    log_level: int = logging.INFO
    port: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    signalled: StopFlag = field(default_factory=StopFlag)  # SIGTERM/SIGINT (serve)
    stopped: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    _slots: list[_Slot] = field(default_factory=list)
    _sock: socket.socket | None = None

    def __post_init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._ready_q: multiprocessing.Queue[tuple[int, int]] = self._ctx.Queue()
        self.zone = LandingZone(self.settings.landing_dir)

    def open(self) -> int:
        """Reserve the port and seal batches stranded by an earlier receiver."""
        self._sock = reserve_port(self.settings.dicom_bind_host, self.settings.dicom_port)
        self.port = int(self._sock.getsockname()[1])
        self.zone.ensure()
        for batch in self.zone.seal_stranded():
            log.info("sealed stranded batch %s", batch.batch_id)
        return self.port

    @property
    def worker_pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process and s.process.pid is not None]

    def run(self) -> None:
        """Start the workers and supervise them until :meth:`stop`; always cleans up."""
        try:
            if self._sock is None:
                self.open()
            self._slots = [_Slot(i) for i in range(self.settings.receiver_workers)]
            for slot in self._slots:
                self._spawn(slot)
            self._await_ready()
            if self.port_file is not None:
                write_atomic(self.port_file, f"{self.port}\n".encode())
            log.info(
                "receiver %s listening on %s:%d with %d workers",
                self.settings.dicom_aet,
                self.settings.dicom_bind_host,
                self.port,
                len(self._slots),
            )
            self.ready.set()
            self._supervise()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._shutdown()
            self.ready.set()
            self.stopped.set()

    def stop(self) -> None:
        """Ask the supervisor to stop, from another thread (a signal handler uses
        :attr:`signalled`: ``Event.set`` is not safe there)."""
        self.stopping.set()

    def _stop_requested(self) -> bool:
        if self.signalled.requested and not self.stopping.is_set():
            self.stopping.set()  # here, outside the signal handler
        return self.stopping.is_set()

    def _spawn(self, slot: _Slot) -> None:
        process = self._ctx.Process(
            target=_run_worker,
            args=(
                self.settings,
                self.port,
                slot.index,
                self._ready_q,
                os.getpid(),
                self.log_level,
            ),
            name=f"receiver-worker-{slot.index}",
        )
        process.start()
        slot.process = process
        slot.started = time.monotonic()

    def _await_ready(self) -> None:
        pending = {s.index for s in self._slots}
        deadline = time.monotonic() + READY_SECONDS
        while pending:
            if self._stop_requested():
                return
            if time.monotonic() > deadline:
                raise ReceiverError("receiver workers did not start in time")
            for slot in self._slots:
                if slot.index in pending and slot.process and not slot.process.is_alive():
                    raise ReceiverError(
                        f"receiver worker {slot.index} exited at start "
                        f"(code {slot.process.exitcode})"
                    )
            with contextlib.suppress(queue.Empty):
                index, _pid = self._ready_q.get(timeout=0.25)
                pending.discard(index)

    def _supervise(self) -> None:
        while not self._stop_requested():
            sentinels = [s.process.sentinel for s in self._slots if s.process is not None]
            multiprocessing.connection.wait(sentinels, timeout=0.25)
            self._drain_ready_queue()
            now = time.monotonic()
            for slot in self._slots:
                process = slot.process
                if process is not None and not process.is_alive() and not self.stopping.is_set():
                    process.join()
                    ran = now - slot.started
                    slot.backoff = 0.5 if ran > 30 else min(slot.backoff * 2, 30.0)
                    slot.restart_at = now + slot.backoff
                    slot.process = None
                    log.error(
                        "receiver worker %d (pid %s) exited with code %s; restarting in %.1f s",
                        slot.index,
                        process.pid,
                        process.exitcode,
                        slot.backoff,
                    )
                    self._seal_stranded()
                elif process is None and now >= slot.restart_at and not self.stopping.is_set():
                    self._spawn(slot)
            if all(s.process is None for s in self._slots):
                self.stopping.wait(0.25)

    def _drain_ready_queue(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._ready_q.get_nowait()

    def _seal_stranded(self) -> None:
        try:
            for batch in self.zone.seal_stranded():
                log.info("sealed stranded batch %s", batch.batch_id)
        except OSError:
            log.exception("sealing stranded batches failed")

    def _shutdown(self) -> None:
        processes = [s.process for s in self._slots if s.process is not None]
        for process in processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("receiver worker pid %s did not stop; killing it", process.pid)
                process.kill()
                process.join()
        self._seal_stranded()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ready_q.close()
        self._ready_q.join_thread()
        log.info("receiver stopped")


@dataclass
class ReceiverHandle:
    """A running receiver started with ``serve(..., block=False)``."""

    receiver: Receiver
    thread: threading.Thread | None

    @property
    def port(self) -> int:
        return self.receiver.port

    @property
    def worker_pids(self) -> list[int]:
        return self.receiver.worker_pids

    def stop(self, timeout: float | None = None) -> None:
        """Stop the workers (their batches get sealed) and wait for the supervisor."""
        self.receiver.stop()
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> ReceiverHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    settings: Settings,
    block: bool = True,
    *,
    port_file: Path | None = None,
    log_level: int | None = None,
) -> ReceiverHandle:
    """Run the receiver: ``settings.receiver_workers`` processes on ``settings.dicom_port``.

    Parameters
    ----------
    settings
        The one settings object (AE title, port, bind host, workers, landing batches).
    block
        If true, supervise in this thread until SIGTERM/SIGINT (installs handlers when
        called from the main thread), then stop. If false, supervise from a background
        thread and return once every worker accepts associations.
    port_file
        If given, the bound port number is written there (atomically) once ready; useful
        with ``dicom_port=0``.

    Returns
    -------
    ReceiverHandle
        ``.port`` is the bound port; ``.stop()`` stops it (already stopped if `block`).

    Raises
    ------
    ReceiverError
        If the port cannot be bound or the workers fail at start.
    """
    level = log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
    receiver = Receiver(settings, port_file=port_file, log_level=level)
    receiver.open()
    if block:
        previous = receiver.signalled.install(signal.SIGTERM, signal.SIGINT)
        try:
            receiver.run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return ReceiverHandle(receiver, None)
    thread = threading.Thread(target=_run_quietly, args=(receiver,), name="receiver-supervisor")
    thread.start()
    receiver.ready.wait()
    if receiver.error is not None:
        thread.join()
        raise receiver.error
    return ReceiverHandle(receiver, thread)


def _run_quietly(receiver: Receiver) -> None:
    # An error at start is kept on the receiver and re-raised by serve() in the caller's
    # thread; a later one is logged here.
    try:
        receiver.run()
    except ReceiverError:
        pass
    except Exception:
        log.exception("receiver supervisor failed")
