"""ops/progress.py: bytes and total, logged at bounded intervals, and the state ``evse status``
shows."""

from __future__ import annotations

import logging

import pytest
import trio

from ops.cli import format_status
from ops.progress import ProgressError, Transfer, Transfers, size


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ops.progress"]


def test_sizes_read_as_people_write_them() -> None:
    assert size(0) == "0 B"
    assert size(999) == "999 B"
    assert size(48_200) == "48.2 kB"
    assert size(12_000_000) == "12.0 MB"
    assert size(3_500_000_000) == "3.5 GB"
    assert size(7_000_000_000_000) == "7000.0 GB"


def test_a_transfer_logs_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ops.progress")
    t = Transfer("firmware download", 12_000_000, interval=10.0, now=0.0)
    # 1,200 chunks of 10 kB, one every 0.1 s: 120 s in all.
    for i in range(1, 1201):
        t.advance(10_000, now=i * 0.1)
    t.finish(now=120.0)
    logged = lines(caplog)
    assert logged[0] == "firmware download: started, 12.0 MB"
    assert logged[-1] == "firmware download: done, 12.0 MB of 12.0 MB (100 %), 100.0 kB/s"
    # Start, one line per 10 s of transfer, the end: never one per chunk.
    assert len(logged) == 1 + 12 + 1
    assert t.lines == len(logged)
    assert "firmware download: 1.0 MB of 12.0 MB (8 %), 100.0 kB/s" in logged


def test_the_state_evse_status_shows() -> None:
    t = Transfer("firmware download", 2_000, now=5.0)
    assert t.snapshot(now=5.0) == {
        "name": "firmware download",
        "state": "running",
        "bytes": 0,
        "total": 2_000,
        "percent": 0.0,
        "rate_bps": None,
        "reason": None,
    }
    t.advance(500, now=7.0)
    snap = t.snapshot(now=7.0)
    assert (snap["bytes"], snap["percent"], snap["rate_bps"]) == (500, 25.0, 250.0)
    t.fail("connection reset", now=9.0)
    snap = t.snapshot(now=100.0)
    # The rate of a finished transfer is frozen at its end.
    assert snap["state"] == "failed" and snap["reason"] == "connection reset"
    assert snap["rate_bps"] == 125.0
    text = format_status({"status": "Available", "transfers": [snap]})
    assert "firmware download: failed at 500 B of 2.0 kB (25 %): connection reset" in text


def test_an_unknown_total_counts_bytes_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ops.progress")
    t = Transfer("log upload", None, interval=1.0, now=0.0)
    t.advance(1_500, now=1.0)
    assert t.snapshot(now=1.0)["percent"] is None
    t.finish(now=2.0)
    assert lines(caplog) == [
        "log upload: started",
        "log upload: 1.5 kB, 1.5 kB/s",
        "log upload: done, 1.5 kB, 750 B/s",
    ]


def test_misuse_is_refused() -> None:
    with pytest.raises(ProgressError, match="negative"):
        Transfer("x", -1, now=0.0)
    with pytest.raises(ProgressError, match="interval"):
        Transfer("x", 10, interval=0.0, now=0.0)
    t = Transfer("x", 10, now=0.0)
    with pytest.raises(ProgressError, match="negative"):
        t.advance(-1, now=1.0)
    with pytest.raises(ProgressError, match="more than the total 10"):
        t.advance(11, now=1.0)
    with pytest.raises(ProgressError, match="finished at 0 of 10 bytes"):
        t.finish(now=1.0)
    t.advance(10, now=1.0)
    t.finish(now=1.0)
    with pytest.raises(ProgressError, match="already done"):
        t.advance(0, now=2.0)
    with pytest.raises(ProgressError, match="already done"):
        t.fail("late", now=2.0)


def test_the_registry_keeps_running_ones_and_the_last_outcomes() -> None:
    transfers = Transfers(keep=2)
    a = transfers.start("a", 1, now=0.0)
    with pytest.raises(ProgressError, match="running"):
        transfers.start("a", 1, now=0.0)
    a.advance(1, now=1.0)
    a.finish(now=1.0)
    transfers.start("b", 1, now=1.0).fail("gone", now=2.0)
    transfers.start("c", 5, now=2.0)
    # "a" (oldest finished) is dropped to keep two; the running "c" stays.
    assert [s["name"] for s in transfers.snapshot(now=3.0)] == ["b", "c"]
    # The same name again replaces its finished entry.
    transfers.start("b", None, now=3.0)
    assert [(s["name"], s["state"]) for s in transfers.snapshot(now=3.0)] == [
        ("c", "running"),
        ("b", "running"),
    ]


async def test_on_trios_clock(autojump_clock: trio.testing.MockClock) -> None:
    """Without ``now`` the intervals are trio's clock: virtual time, exact."""
    t = Transfer("firmware download", 100_000, interval=5.0)
    for _ in range(100):
        await trio.sleep(0.5)
        t.advance(1_000)
    assert trio.current_time() == pytest.approx(50.0)
    # Start plus one line every 5 s of the 50.
    assert t.lines == 1 + 10
    assert t.snapshot()["rate_bps"] == pytest.approx(2_000.0)
    t.finish()
    assert t.snapshot()["state"] == "done"
