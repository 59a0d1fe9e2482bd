"""The routing feature's worst-case inputs are bounded (docs/routing.md, "Limits").

Each test feeds a hostile input to the code under test in a child Python process and reads
that process's peak RSS (VmHWM, from ``/proc/<pid>/status``) once the work is done; the
same child with a benign input is the baseline. The difference is what the hostile input
cost. Where it is cheap, the same child also runs with the bound lifted, to show the
measurement would catch the unbounded cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.routing.senders_data import outgoing, study_files
from tests.routing.test_rules import DOCUMENTED
from tests.storage.test_read_ahead_memory import _memory
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.routing.commitments import (
    PENDING,
    RECORD_MAX_BYTES,
    REPORTED,
    REPORTS_PER_TICK,
    commitments_dir,
)
from vannah_pipelines.routing.rules import MAX_RULES, Coercion, RulesError
from vannah_pipelines.routing.senders import (
    STOW_RESPONSE_MAX_BYTES,
    Delivered,
    Outgoing,
    send_each,
)
from vannah_pipelines.routing.source import (
    DEFAULT_MAX_BYTES,
    LAST_GOOD_FILE,
    RulesSource,
    read_rules_file,
)
from vannah_pipelines.settings import Settings

MIB = 1024**2
ROOT = Path(__file__).resolve().parents[2]
# Ends a child script: its result on one line, then wait for the parent to read VmHWM.
_REPORT = "\nprint(json.dumps(result), flush=True)\nsys.stdin.read()\n"


def run_child(script: str, *args: str, log: Path, hang_guard: float = 600) -> tuple[Any, int]:
    """Run `script` (which sets ``result``) in a child Python; its result and peak RSS.

    The peak is read from the live child's ``/proc/<pid>/status`` after it printed its
    result (it then waits on stdin). `hang_guard` kills a child that never reports, so a
    hang fails the test instead of stalling the suite; it is not a timing assertion."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import json, sys\n" + script + _REPORT, *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        guard = threading.Timer(hang_guard, proc.kill)
        guard.start()
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline()
            assert line, f"the child reported nothing:\n{log.read_text()[-3000:]}"
            peak = _memory(proc.pid)["VmHWM"]
            proc.stdin.close()
            assert proc.wait() == 0, log.read_text()[-3000:]
        finally:
            guard.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return json.loads(line), peak


# ---------------------------------------------------------------- 1. the rules file

_RULES_CHILD = """
from pathlib import Path
from vannah_pipelines.routing.source import RulesSource
source = RulesSource(Path(sys.argv[1]), Path(sys.argv[2]), max_bytes=int(sys.argv[3]))
rules = source.current()
result = {"names": [r.name for r in rules.rules], "origin": source.origin,
          "error": source.error}
"""


def test_rules_file_too_large_is_refused_unread_and_last_good_rules_stay(
    tmp_path: Path,
) -> None:
    """A 200 MiB rules file is refused from its size; the last good rules stay in force.

    Unbounded, the file was read whole (and hashed, then handed to the JSON parser): the
    child's peak grew by 250 MiB for it (measured below, with the bound lifted).
    Bounded, the growth is what the baseline costs (measured: under 1 MiB)."""
    state, good_file, huge = tmp_path / "state", tmp_path / "good.json", tmp_path / "huge.json"
    good_file.write_text(json.dumps(DOCUMENTED))
    assert RulesSource(good_file, state).current().rules  # saves the last good rules
    assert (state / LAST_GOOD_FILE).is_file()
    with huge.open("wb") as fp:  # sparse: 200 MiB of zero bytes, none on disk
        fp.truncate(200 * MIB)
    names = [r["name"] for r in DOCUMENTED["rules"]]
    limit = str(DEFAULT_MAX_BYTES)

    base, base_peak = run_child(_RULES_CHILD, str(good_file), str(state), limit, log=tmp_path / "b")
    hostile, peak = run_child(_RULES_CHILD, str(huge), str(state), limit, log=tmp_path / "h")
    unbounded, unbounded_peak = run_child(
        _RULES_CHILD, str(huge), str(state), str(1 << 30), log=tmp_path / "u"
    )
    growth, unbounded_growth = peak - base_peak, unbounded_peak - base_peak
    print(
        f"rules: baseline {base_peak / MIB:.1f} MiB, 200 MiB file {peak / MIB:.1f} MiB "
        f"(+{growth / MIB:.1f}), unbounded +{unbounded_growth / MIB:.1f} MiB"
    )
    assert base == {"names": names, "origin": "file", "error": None}
    assert hostile["names"] == names and hostile["origin"] == "last-good"
    assert hostile["error"] == (
        f"{huge}: {200 * MIB} bytes, more than the limit of {DEFAULT_MAX_BYTES} bytes "
        "(routing_rules_max_bytes); not read"
    )
    assert growth < 32 * MIB, f"{growth / MIB:.0f} MiB"
    # The measurement sees the unbounded read: the bound is what keeps the peak down.
    assert unbounded["names"] == names and "not JSON" in unbounded["error"]
    assert unbounded_growth > 150 * MIB, f"{unbounded_growth / MIB:.0f} MiB"


def test_rules_file_grown_past_the_limit_refused_then_good_again(tmp_path: Path) -> None:
    rules_file, state = tmp_path / "rules.json", tmp_path / "state"
    rules_file.write_text(json.dumps(DOCUMENTED))
    source = RulesSource(rules_file, state, max_bytes=4096)
    good = source.current()
    padded = json.dumps(DOCUMENTED) + " " * 4096  # valid JSON, but over the limit
    rules_file.write_text(padded)
    assert source.current() == good
    assert source.error is not None and "more than the limit of 4096 bytes" in source.error
    rules_file.write_text(json.dumps({"rules": DOCUMENTED["rules"][:1]}))
    assert [r.name for r in source.current().rules] == [DOCUMENTED["rules"][0]["name"]]
    assert source.error is None
    with pytest.raises(RulesError, match="more than the limit of 100 bytes"):
        read_rules_file(rules_file, max_bytes=100)


def test_rules_file_with_too_many_rules_or_too_deep_is_refused(tmp_path: Path) -> None:
    rules_file, state = tmp_path / "rules.json", tmp_path / "state"
    rules_file.write_text(json.dumps(DOCUMENTED))
    source = RulesSource(rules_file, state)
    good = source.current()
    template = DOCUMENTED["rules"][1]
    many = {"rules": [{**template, "name": f"rule {n}"} for n in range(MAX_RULES + 1)]}
    rules_file.write_text(json.dumps(many))
    assert len(rules_file.read_bytes()) < DEFAULT_MAX_BYTES  # the count refuses it, not the size
    assert source.current() == good
    assert source.error == f"{rules_file}: {MAX_RULES + 1} rules, more than the limit of 1000"
    rules_file.write_text("[" * 200_000)  # a parser recursing per level would overflow
    assert source.current() == good
    assert source.error == f"{rules_file}: not JSON: nested too deeply"
    rules_file.write_text(json.dumps({"rules": many["rules"][:MAX_RULES]}))
    assert len(source.current().rules) == MAX_RULES and source.error is None


def test_inline_rules_past_the_count_are_refused_with_the_settings(tmp_path: Path) -> None:
    """The settings' inline ``rules`` have the rules file's cap: refused, before any rule
    is validated, with the settings (``vannah`` does not start on them)."""
    template = DOCUMENTED["rules"][1]
    many = [{**template, "name": f"rule {n}"} for n in range(MAX_RULES + 1)]
    with pytest.raises(ValueError, match=f"rules: {MAX_RULES + 1} rules, more than the limit"):
        Settings(data_dir=tmp_path, routing_rules=many)
    assert len(Settings(data_dir=tmp_path, routing_rules=many[:MAX_RULES]).routing_rules) == 1000


def test_too_large_file_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused from the stat: no read of the file at all."""
    rules_file = tmp_path / "rules.json"
    with rules_file.open("wb") as fp:
        fp.truncate(DEFAULT_MAX_BYTES + 1)
    opened: list[str] = []
    real_open = Path.open

    def spy(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == rules_file:
            opened.append(str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self}"))
    source = RulesSource(rules_file, tmp_path / "state")
    assert source.current().rules == [] and "not read" in (source.error or "")
    assert opened == []


# ---------------------------------------------------------------- 2. STOW-RS answers

HUGE_ANSWER = 256 * MIB  # the "endless" answer ends here, so an unbounded read ends too
_STORED = b'{"00081199": {"vr": "SQ", "Value": []}}'


class _HostileStow(BaseHTTPRequestHandler):
    """Answers ``POST /<kind>/studies`` with 200 and: ``ok`` a small Store Instances
    Response; ``huge`` an endless JSON body (no length; whitespace until the client goes
    or HUGE_ANSWER bytes); ``trickle`` 1 byte every half second of a 10,000-byte body."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        while length > 0:  # drain the request
            length -= len(self.rfile.read(min(length, 1 << 20)))
        kind = self.path.strip("/").split("/")[0]
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        if kind == "ok":
            self.send_header("Content-Length", str(len(_STORED)))
            self.end_headers()
            self.wfile.write(_STORED)
            return
        if kind == "trickle":
            self.send_header("Content-Length", "10000")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            if kind == "huge":
                self.wfile.write(b'{"00081199": {"vr": "SQ", "Value": [')
                block = b" " * MIB
                for _ in range(HUGE_ANSWER // MIB):
                    self.wfile.write(block)
            else:
                for _ in range(10_000):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.5)
        except OSError:  # the client hung up: what it should do
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hostile_stow() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostileStow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


_STOW_CHILD = """
from tests.routing.senders_data import outgoing, study_files
from vannah_pipelines.routing.rules import StowDestination
from vannah_pipelines.routing.senders import StowSender
sender = StowSender(StowDestination(type="stow", url=sys.argv[1]), secrets={},
                    max_response_bytes=int(sys.argv[2]), response_seconds=float(sys.argv[3]))
results = sender.send([outgoing(b) for b in study_files()])
sender.close()
result = [[r.ok, r.detail, r.transient] for r in results]
"""


def test_stow_answer_too_large_fails_the_request_transiently(
    tmp_path: Path, hostile_stow: str
) -> None:
    """A STOW-RS peer answering 200 with an endless body: the sender reads 16 MiB of it,
    fails the request transiently and closes the connection.

    Unbounded (``response.content``), the whole answer was held: measured below with the
    limit lifted, the child's peak grew by 512 MiB for a 256 MiB answer — an endless one
    would have grown it until the process died. Bounded: ~16 MiB over the baseline."""
    cap, deadline, url = str(STOW_RESPONSE_MAX_BYTES), "60", hostile_stow
    base, base_peak = run_child(_STOW_CHILD, f"{url}/ok", cap, deadline, log=tmp_path / "b")
    huge, peak = run_child(_STOW_CHILD, f"{url}/huge", cap, deadline, log=tmp_path / "h")
    lifted, lifted_peak = run_child(
        _STOW_CHILD, f"{hostile_stow}/huge", str(1 << 40), deadline, log=tmp_path / "u"
    )
    growth, lifted_growth = peak - base_peak, lifted_peak - base_peak
    print(
        f"STOW answer: baseline {base_peak / MIB:.1f} MiB, endless answer "
        f"+{growth / MIB:.1f} MiB, limit lifted +{lifted_growth / MIB:.1f} MiB"
    )
    assert len(base) == 5 and all(ok for ok, _, _ in base), base
    detail = (
        f"STOW-RS to {hostile_stow}/huge/studies: answer larger than {STOW_RESPONSE_MAX_BYTES} "
        "bytes (the limit); not read further, connection closed"
    )
    assert huge == [[False, detail, True]] * 5
    assert growth < 2 * STOW_RESPONSE_MAX_BYTES, f"{growth / MIB:.0f} MiB"
    assert all(ok for ok, _, _ in lifted)  # read whole: 200, "stored" (ill-formed JSON ignored)
    assert lifted_growth > HUGE_ANSWER - 16 * MIB, f"{lifted_growth / MIB:.0f} MiB"


def test_stow_answer_trickling_is_cut_at_the_deadline(tmp_path: Path, hostile_stow: str) -> None:
    """A peer trickling its answer (a byte every half second, each read well within the
    read timeout) does not hold the run: the answer is cut `response_seconds` after its
    headers. Without the deadline this answer would take 5,000 s (the hang guard of
    run_child would kill the child and fail the test)."""
    result, _ = run_child(
        _STOW_CHILD, f"{hostile_stow}/trickle", str(STOW_RESPONSE_MAX_BYTES), "2",
        log=tmp_path / "t", hang_guard=300,
    )  # fmt: skip
    detail = (
        f"STOW-RS to {hostile_stow}/trickle/studies: answer not complete within 2 s of its "
        "headers (the limit); connection closed"
    )
    assert result == [[False, detail, True]] * 5


# ---------------------------------------------------------------- 4. coerced batches

LARGE_SIDE = 3240  # 3240 x 3240 x 16 bit: 20 MiB of pixel data per instance


def ingest_copies(settings: Settings, count: int, side: int) -> str:
    """Ingest `count` CT instances of one study (`side` x `side` pixels, the same pixel
    bytes under fresh SOP Instance UIDs), as tests.routing.test_dry_run._ingest does."""
    ds = make_instance("CT", study_uid=generate_uid(), series_uid=generate_uid(), rows=side,
                       columns=side)  # fmt: skip
    batch = LandingZone(settings.landing_dir).open_batch("dimse")
    for number in range(1, count + 1):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        facts = ReceiveFacts(
            str(ds.SOPInstanceUID), str(ds.SOPClassUID), "1.2.840.10008.1.2.1", "dimse",
            calling_ae="CT_SCANNER", received_at="2026-03-02T10:00:00+00:00",
        )  # fmt: skip
        batch.write_instance(to_part10(ds), facts)
    sealed = batch.seal()
    assert sealed is not None
    result = ingest_batches(IngestPaths.for_settings(settings), [sealed.batch_id])
    assert result.instances == count and not result.quarantined
    return str(ds.StudyInstanceUID)


_COERCE_CHILD = """
from datetime import UTC, datetime
from pathlib import Path
from tests.routing.test_deliveries import _record, _senders
from vannah_pipelines.routing.deliveries import queue_deliveries, send_due, tier_opener
from vannah_pipelines.routing.rules import parse_rules
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.lifecycle import open_catalog
from vannah_pipelines.storage.tiers import StorageTiers
settings = Settings(data_dir=Path(sys.argv[1]))
rules = parse_rules([{"name": "CT to the folder", "condition": {"modality": "CT"},
                      "destination": {"type": "folder", "path": sys.argv[2]},
                      "coerce": {"prefix": {"PatientID": "VHC-"}}}])
now = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)
catalog = open_catalog(settings)
record = _record(settings)
queue_deliveries(catalog, rules, record, since=None, now=now)
catalog.refresh()
done = send_due(catalog, rules, record, tier_opener(StorageTiers(settings)), _senders(settings),
                now=lambda: now)
result = {"sent": done.sent, "failed": done.failed}
"""


COERCED_COPIES = 25  # one batch (50 at most); unbounded, ~500 MiB of copies


def test_coerced_batch_of_large_instances_holds_a_bounded_share(tmp_path: Path) -> None:
    """25 instances of 20 MiB, routed with coercion to a folder (one batch).

    Before: the coerced copies were made first, then sent — with 50 such instances the
    child's peak grew by ~1 GiB over the baseline (measured +1037 MiB; 25 would hold
    ~500 MiB). Now a batch is coerced and sent in groups of at most COERCED_GROUP_BYTES
    (64 MiB) of coerced bytes (measured +102 MiB with 50: a group held while the next
    instance is coerced; the same with 25)."""
    small, large = Settings(data_dir=tmp_path / "small"), Settings(data_dir=tmp_path / "large")
    ingest_copies(small, COERCED_COPIES, 16)
    study = ingest_copies(large, COERCED_COPIES, LARGE_SIDE)
    base, base_peak = run_child(
        _COERCE_CHILD, str(small.data_dir), str(tmp_path / "out-small"), log=tmp_path / "b"
    )
    sent, peak = run_child(
        _COERCE_CHILD, str(large.data_dir), str(tmp_path / "out-large"), log=tmp_path / "l"
    )
    growth = peak - base_peak
    print(
        f"coerced batch: baseline {base_peak / MIB:.1f} MiB, {COERCED_COPIES} x 20 MiB "
        f"{peak / MIB:.1f} MiB (+{growth / MIB:.1f})"
    )
    assert base == sent == {"sent": COERCED_COPIES, "failed": 0}
    written = sorted((tmp_path / "out-large" / study).rglob("*.dcm"))
    assert len(written) == COERCED_COPIES
    assert all(f.stat().st_size > LARGE_SIDE * LARGE_SIDE * 2 for f in written)
    first = pydicom.dcmread(written[0], stop_before_pixels=True)
    assert str(first.PatientID).startswith("VHC-")  # coerced, not the stored bytes
    assert growth < 200 * MIB, f"{growth / MIB:.0f} MiB"


_PLAIN_CHILD = _COERCE_CHILD.replace(
    ',\n                      "coerce": {"prefix": {"PatientID": "VHC-"}}', ""
)
HUGE_SIDE = 7240  # 7240 x 7240 x 16 bit: 100 MiB of pixel data in one instance


def test_a_huge_instance_is_streamed_to_a_folder_not_held(tmp_path: Path) -> None:
    """One 100 MiB instance to a folder destination, uncoerced. Before, the folder sender
    read the whole instance into memory to check its checksum, then wrote it (+100 MiB
    over the baseline at least); now it streams a MiB at a time through the checksum into
    the temp file, and renames it once the checksum matched."""
    assert _PLAIN_CHILD != _COERCE_CHILD
    small, large = Settings(data_dir=tmp_path / "small"), Settings(data_dir=tmp_path / "large")
    ingest_copies(small, 1, 16)
    study = ingest_copies(large, 1, HUGE_SIDE)
    base, base_peak = run_child(
        _PLAIN_CHILD, str(small.data_dir), str(tmp_path / "out-small"), log=tmp_path / "b"
    )
    sent, peak = run_child(
        _PLAIN_CHILD, str(large.data_dir), str(tmp_path / "out-large"), log=tmp_path / "l"
    )
    growth = peak - base_peak
    print(f"huge instance: baseline {base_peak / MIB:.1f} MiB, {peak / MIB:.1f} MiB")
    assert base == sent == {"sent": 1, "failed": 0}
    [written] = (tmp_path / "out-large" / study).rglob("*.dcm")
    assert written.stat().st_size > HUGE_SIDE * HUGE_SIDE * 2
    assert growth < 32 * MIB, f"{growth / MIB:.0f} MiB"


def test_send_each_coerces_in_bounded_groups_and_stops_at_a_failing_destination() -> None:
    batch = [outgoing(b) for b in study_files(4)]
    coercion = Coercion(prefix={"PatientID": "VHC-"})
    limit = max(o.size for o in batch) + 512  # the largest (pydicom's CT) goes alone
    stored = {o.sop_instance_uid: o.checksum for o in batch}
    groups: list[list[Outgoing]] = []

    def deliver(ready: list[Outgoing]) -> list[Delivered]:
        groups.append(ready)
        return [Delivered(o.sop_instance_uid, True, "stored") for o in ready]

    results = send_each(batch, coercion, deliver, group_bytes=limit)
    assert [r.sop_instance_uid for r in results] == [o.sop_instance_uid for o in batch]
    assert all(r.ok for r in results) and len(groups) > 1
    assert [o.sop_instance_uid for g in groups for o in g] == [o.sop_instance_uid for o in batch]
    for group in groups:  # a group holds at most `limit` coerced bytes (or one instance)
        assert len(group) == 1 or sum(o.size for o in group) <= limit
        assert all(o.checksum != stored[o.sop_instance_uid] for o in group)  # coerced copies
    groups.clear()
    send_each(batch, None, deliver, group_bytes=limit)  # no copies in memory: one call
    assert [len(g) for g in groups] == [len(batch)]

    def down(ready: list[Outgoing]) -> list[Delivered]:
        groups.append(ready)
        return [Delivered(o.sop_instance_uid, False, "peer down", True) for o in ready]

    groups.clear()
    results = send_each(batch, coercion, down, group_bytes=limit)
    assert len(groups) == 1  # the rest is neither coerced nor tried
    tried = len(groups[0])
    assert [r.detail for r in results] == ["peer down"] * tried + ["not tried: peer down"] * (
        len(batch) - tried
    )
    assert all(r.transient and not r.ok for r in results)


# ---------------------------------------------------------------- 3. the commitment spool

_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
_PEER = {"aet": "PEER", "host": "127.0.0.1", "port": 11112}


def spool_record(folder: Path, uid: str, state: str, mtime_s: int, refs: int = 10) -> None:
    """A record as CommitmentSpool.write lays it out (sorted keys), with mtime `mtime_s`
    (written directly: thousands of fsyncs would only slow the test)."""
    references = [[_SOP_CLASS, f"{uid}.{n}"] for n in range(refs)]
    record: dict[str, Any] = {"state": state, "peer": _PEER, "calling_aet": "VANNAH",
                              "transaction_uid": uid, "requested_at": mtime_s - 60,
                              "references": references}  # fmt: skip
    if state == REPORTED:
        record |= {"committed": record["references"], "failed": [], "reported_at": mtime_s,
                   "reported_by": "PEER", "reported_on": "new-association"}  # fmt: skip
    path = folder / f"{uid}.json"
    path.write_text(json.dumps(record, sort_keys=True))
    os.utime(path, (mtime_s, mtime_s))


def huge_record(folder: Path, uid: str, mtime_s: int, size: int) -> Path:
    """A reported record of about `size` bytes (valid JSON: 1.5 million references at
    100 MiB)."""
    path = folder / f"{uid}.json"
    pair = json.dumps([_SOP_CLASS, "1.2.826.0.1.3680043.10.99.123456789"]).encode() + b", "
    with path.open("wb") as fp:
        fp.write(b'{"calling_aet": "VANNAH", "committed": [')
        block = pair * (MIB // len(pair))
        while fp.tell() + len(block) <= size:
            fp.write(block)
        fp.write(pair[:-2] + b'], "failed": [], "peer": ' + json.dumps(_PEER).encode())
        fp.write(f', "state": "reported", "transaction_uid": "{uid}"}}'.encode())
    os.utime(path, (mtime_s, mtime_s))
    return path


_SPOOL_CHILD = """
from datetime import UTC, datetime
from pathlib import Path
from vannah_pipelines.routing.commitments import CommitmentSpool, commitments_dir
from vannah_pipelines.routing.deliveries import apply_spooled_reports
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.lifecycle import open_catalog
settings = Settings(data_dir=Path(sys.argv[1]))
spool = CommitmentSpool(commitments_dir(settings.data_dir))
catalog = open_catalog(settings)
appended = []
result = [apply_spooled_reports(catalog, spool, appended.extend, now=datetime.now(UTC))
          for _ in range(int(sys.argv[2]))]
"""


def test_commitment_spool_is_read_a_bounded_share_per_tick(tmp_path: Path) -> None:
    """5,000 reported records, 500 pending ones (older: a peer that never reported) and a
    100 MiB reported record (the oldest): each call reads at most REPORTS_PER_TICK (1,000)
    records whole, oldest first, one at a time; the 100 MiB one is set aside unread;
    pending ones are skipped from their last bytes, so they never starve the reports.

    Unbounded, one tick read every record into a list, the 100 MiB one whole: reading and
    parsing that one alone grew a process's peak by 500 MiB (measured once, by hand: its
    1.5 million references). Bounded: measured +1.8 MiB over the 50-record baseline."""
    base_dir, hostile_dir = tmp_path / "base", tmp_path / "hostile"
    base_spool, spool = commitments_dir(base_dir), commitments_dir(hostile_dir)
    base_spool.mkdir(parents=True)
    spool.mkdir(parents=True)
    # Within the last 12 h: pending records younger than REPORT_WAIT_SECONDS (24 h) are
    # still waiting for their reports (older ones would be taken as expired).
    t0 = int(time.time()) - 12 * 3600
    for n in range(50):
        spool_record(base_spool, f"1.2.826.0.1.3680043.10.2.{n}", REPORTED, t0 + 10_000 + n)
    pending = [f"1.2.826.0.1.3680043.10.1.{n}" for n in range(500)]
    for n, uid in enumerate(pending):
        spool_record(spool, uid, PENDING, t0 + n)
    huge = huge_record(spool, "1.2.826.0.1.3680043.10.3.1", t0 + 600, 100 * MIB)
    huge_size = huge.stat().st_size
    assert huge_size > 99 * MIB
    reported = [f"1.2.826.0.1.3680043.10.2.{n}" for n in range(5000)]
    for n, uid in enumerate(reported):  # oldest first: the order of `reported`
        spool_record(spool, uid, REPORTED, t0 + 10_000 + 7 * (n % 713) + n // 713)
    oldest_first = [name for _, name in sorted(
        ((spool / f"{uid}.json").stat().st_mtime_ns, f"{uid}.json") for uid in reported
    )]  # fmt: skip

    base, base_peak = run_child(_SPOOL_CHILD, str(base_dir), "7", log=tmp_path / "b")
    calls, peak = run_child(_SPOOL_CHILD, str(hostile_dir), "7", log=tmp_path / "h")
    growth = peak - base_peak
    print(
        f"commitment spool: baseline {base_peak / MIB:.1f} MiB, 5,000 + 500 pending + "
        f"100 MiB record {peak / MIB:.1f} MiB (+{growth / MIB:.1f})"
    )
    assert [len(c) for c in base] == [50, 0, 0, 0, 0, 0, 0]
    assert [len(c) for c in calls] == [REPORTS_PER_TICK] * 5 + [0, 0]
    assert [f"{uid}.json" for c in calls for uid in c] == oldest_first  # oldest first, all
    rejected = spool / "rejected"
    assert not huge.exists() and (rejected / huge.name).is_file()
    reason = (rejected / f"{huge.name}.reason").read_text()
    assert reason == f"{huge_size} bytes, more than the limit of {RECORD_MAX_BYTES}; not read\n"
    left = sorted(p.name for p in spool.glob("*.json"))
    assert left == sorted(f"{uid}.json" for uid in pending)  # waiting for their reports
    assert growth < 32 * MIB, f"{growth / MIB:.0f} MiB"
