"""Unit tests of receiver.limits: the pace, PDU meter and pending-connection cap (no network)."""

from __future__ import annotations

import struct

import pytest

from receiver.limits import (
    LimitExceededError,
    Limits,
    Pace,
    PduMeter,
    PendingConnections,
)

LIMITS = Limits(
    max_pdu_bytes=16_384,
    max_instance_bytes=100_000,
    min_bytes_per_second=1000,
    association_max_seconds=3600.0,
    max_pending_connections=2,
    window_seconds=10.0,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _pdu(pdvs: list[tuple[int, bytes]], context: int = 1) -> bytes:
    body = b"".join(struct.pack(">LBB", len(d) + 2, context, f) + d for f, d in pdvs)
    return struct.pack(">BxL", 0x04, len(body)) + body


def test_pace_aborts_a_pdu_slower_than_the_minimum() -> None:
    clock = Clock()
    pace = Pace(LIMITS, idle_seconds=60.0, clock=clock)
    pace.received(6)  # a PDU starts
    for _ in range(9):
        clock.now += 1.0
        pace.received(10)  # 10 bytes/s against 1000
        assert pace.wait() <= 10.0
    clock.now += 1.0  # the window ends, with a read blocked or not
    with pytest.raises(LimitExceededError, match="under 1000 bytes/s"):
        pace.wait()
    with pytest.raises(LimitExceededError, match="under 1000 bytes/s"):
        pace.received(10)


def test_pace_lets_a_pdu_at_the_minimum_go_on_and_ignores_time_between_pdus() -> None:
    clock = Clock()
    pace = Pace(LIMITS, idle_seconds=60.0, clock=clock)
    for _ in range(30):  # 30 s at 2000 bytes/s within one PDU
        clock.now += 1.0
        pace.received(2000)
        assert pace.wait() > 0
    pace.pdu_done()
    clock.now += 50.0  # idle between PDUs: only the idle timeout applies
    assert 0 < pace.wait() <= 10.0


def test_pace_times_out_a_silent_peer_and_ends_at_the_deadline() -> None:
    clock = Clock()
    pace = Pace(LIMITS, idle_seconds=60.0, clock=clock)
    clock.now = 59.0
    assert pace.wait() == pytest.approx(1.0)
    clock.now = 60.0
    with pytest.raises(TimeoutError):
        pace.wait()
    clock.now = 3599.0
    pace.touch()
    assert pace.wait() == pytest.approx(1.0)
    clock.now = 3600.0
    with pytest.raises(LimitExceededError, match="longer than 3600 s"):
        pace.wait()


def test_pace_without_a_minimum_never_aborts_a_slow_pdu() -> None:
    clock = Clock()
    limits = Limits(16_384, 100_000, 0, 3600.0, 2)
    pace = Pace(limits, idle_seconds=60.0, clock=clock)
    for _ in range(100):
        clock.now += 30.0
        pace.received(1)
        assert pace.wait() > 0


def test_pdu_meter_refuses_a_long_pdu_on_its_header() -> None:
    meter = PduMeter(LIMITS)
    meter.feed(_pdu([(0x03, b"x" * 100)]))
    with pytest.raises(LimitExceededError, match="16385-byte P-DATA-TF PDU"):
        meter.feed(struct.pack(">BxL", 0x04, 16_385))
    meter = PduMeter(LIMITS)
    with pytest.raises(LimitExceededError, match="type 0x01"):
        meter.feed(struct.pack(">BxL", 0x01, 2 << 20))


def test_pdu_meter_counts_a_data_set_across_pdus_byte_by_byte() -> None:
    meter = PduMeter(LIMITS)
    stream = _pdu([(0x03, b"c" * 40)])  # a command
    stream += b"".join(_pdu([(0x00, b"d" * 10_000)]) for _ in range(9))
    stream += _pdu([(0x02, b"d" * 10_000)])  # 100,000 bytes: at the limit, accepted
    done = sum(meter.feed(stream[i : i + 1]) for i in range(len(stream)))
    assert done == 11 == meter.pdus
    assert not meter.in_pdu
    # The last fragment reset the count: a next data set starts from zero.
    meter.feed(_pdu([(0x02, b"d" * 10_000)]))
    meter.feed(_pdu([(0x00, b"d" * 10_000)]) * 10)
    with pytest.raises(LimitExceededError, match="100000-byte limit"):
        meter.feed(_pdu([(0x00, b"d")]))


def test_pending_connections_admits_up_to_the_cap_and_releases_once() -> None:
    pending = PendingConnections(2)
    first, second = pending.admit(), pending.admit()
    assert first is not None and second is not None
    assert pending.admit() is None
    first()
    first()  # idempotent
    assert pending.count == 1
    third = pending.admit()
    assert third is not None
    assert pending.admit() is None
