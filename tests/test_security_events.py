"""Security events (ocpp16/security_events.py, ocpp16/queue.py's SecurityEventQueue):
the whitepaper's table, the security log record, the persistent queue (order, the
cap that never drops a critical event, restarts), and delivery through a real
ChargePoint session: events raised offline are sent in order after the
registration, a lost connection resends the same message, refusals give up.

Real SQLite files; the charge point runs on tests/chargepoint_rig.py (a second
RpcSession checks every frame against the OCPP schemas). Virtual time is exact:
the rig's autojump waits for worker threads, and the tests wait for the events'
writer thread with ``flush()`` in a worker thread.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from evse.store import Store
from ocpp16.chargepoint import ChargePoint
from ocpp16.clock import UNSYNCED, CentralClock
from ocpp16.config import Configuration
from ocpp16.errors import QueueError
from ocpp16.profiles import Handler, Task
from ocpp16.queue import (
    SECURITY_DEAD_KEEP,
    SECURITY_SCHEMA_VERSION,
    SecurityEventQueue,
    TransactionQueue,
)
from ocpp16.schemas import validate_request
from ocpp16.security_events import EVENTS, SecurityEvents, is_critical, no_emit
from tests.chargepoint_rig import CentralSystem, Rig, open_rig, settle

T0 = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "station.db"


@pytest.fixture
def queue(db: Path) -> Iterator[SecurityEventQueue]:
    with SecurityEventQueue.open(db) as q:
        yield q


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


class Ticks:
    """A wall clock one second further at each reading."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> datetime:
        self.n += 1
        return T0 + timedelta(seconds=self.n)


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {
            str(row[0])
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    finally:
        conn.close()


# -- the whitepaper's table -----------------------------------------------------------


def test_the_table_has_the_whitepapers_events_and_critical_flags() -> None:
    assert set(EVENTS) == {
        "FirmwareUpdated",
        "FailedToAuthenticateAtCentralSystem",
        "CentralSystemFailedToAuthenticate",
        "SettingSystemTime",
        "StartupOfTheDevice",
        "ResetOrReboot",
        "SecurityLogWasCleared",
        "ReconfigurationOfSecurityParameters",
        "MemoryExhaustion",
        "InvalidMessages",
        "AttemptedReplayAttacks",
        "TamperDetectionActivated",
        "InvalidFirmwareSignature",
        "InvalidFirmwareSigningCertificate",
        "InvalidCentralSystemCertificate",
        "InvalidChargePointCertificate",
        "InvalidTLSVersion",
        "InvalidTLSCipherSuite",
    }
    assert {name for name in EVENTS if is_critical(name)} == {
        "FirmwareUpdated",
        "SettingSystemTime",
        "StartupOfTheDevice",
        "ResetOrReboot",
        "SecurityLogWasCleared",
        "MemoryExhaustion",
        "TamperDetectionActivated",
    }
    # A vendor's own event is not critical; the default emit does nothing.
    assert not is_critical("VendorDoorOpened")
    no_emit("StartupOfTheDevice", None)


# -- the queue ---------------------------------------------------------------------------


def test_the_security_tables_are_apart_and_only_made_by_their_own_queue(db: Path) -> None:
    TransactionQueue.open(db).close()
    assert not {"ocpp_security_events", "ocpp_security_dead"} & tables(db)
    with SecurityEventQueue.open(db) as q, TransactionQueue.open(db) as tq:
        assert q.schema_version == SECURITY_SCHEMA_VERSION >= 1
        assert tq.schema_version >= 1
    conn = sqlite3.connect(db)
    try:
        versions = dict(conn.execute("SELECT key, value FROM ocpp_meta"))
    finally:
        conn.close()
    assert versions["security_events_schema_version"] == SECURITY_SCHEMA_VERSION
    assert "schema_version" in versions  # the transaction queue's own, untouched
    assert {"ocpp_security_events", "ocpp_security_dead", "ocpp_queue"} <= tables(db)


def test_a_newer_security_schema_is_refused(db: Path) -> None:
    SecurityEventQueue.open(db).close()
    conn = sqlite3.connect(db)
    conn.execute(
        "UPDATE ocpp_meta SET value = ? WHERE key = 'security_events_schema_version'",
        (SECURITY_SCHEMA_VERSION + 1,),
    )
    conn.commit()
    conn.close()
    with pytest.raises(QueueError, match="newer than this firmware"):
        SecurityEventQueue.open(db)


def enqueue(q: SecurityEventQueue, name: str, cap: int = 1000) -> int | None:
    result = q.enqueue(
        name,
        {"type": name, "timestamp": "2026-04-01T09:00:00.000Z"},
        critical=is_critical(name),
        cap=cap,
    )
    return None if result.queued is None else result.queued.seq


def test_fifo_and_the_message_id_fixed_at_enqueue_across_a_reopen(db: Path) -> None:
    with SecurityEventQueue.open(db) as q:
        for name in ("StartupOfTheDevice", "InvalidMessages", "ResetOrReboot"):
            enqueue(q, name)
        before = q.pending()
    with SecurityEventQueue.open(db) as q:
        after = q.pending()
        assert [e.event_type for e in after] == [
            "StartupOfTheDevice",
            "InvalidMessages",
            "ResetOrReboot",
        ]
        assert [e.unique_id for e in after] == [e.unique_id for e in before]
        assert len({e.unique_id for e in after}) == 3
        assert [e.critical for e in after] == [True, False, True]
        head = q.head()
        assert head is not None and head.seq == after[0].seq
        assert q.delivered(head.seq)
        assert not q.delivered(head.seq)  # no longer pending: harmless
        new = q.head()
        assert new is not None and new.event_type == "InvalidMessages"


def test_the_cap_drops_the_oldest_non_critical_and_never_a_critical_one(
    queue: SecurityEventQueue,
) -> None:
    cap = 4
    names = [
        "StartupOfTheDevice",  # critical
        "InvalidMessages",
        "AttemptedReplayAttacks",
        "SettingSystemTime",  # critical
        "InvalidTLSVersion",  # 5th: drops InvalidMessages
        "FirmwareUpdated",  # critical, 6th: drops AttemptedReplayAttacks
    ]
    dropped: list[str] = []
    for name in names:
        result = queue.enqueue(name, {"type": name}, critical=is_critical(name), cap=cap)
        assert result.queued is not None
        dropped += [e.event_type for e in result.dropped]
    assert dropped == ["InvalidMessages", "AttemptedReplayAttacks"]
    assert [e.event_type for e in queue.pending()] == [
        "StartupOfTheDevice",
        "SettingSystemTime",
        "InvalidTLSVersion",
        "FirmwareUpdated",
    ]
    # Full of critical events but one: a critical event pushes the last non-critical out...
    result = queue.enqueue("ResetOrReboot", {"type": "x"}, critical=True, cap=cap)
    assert [e.event_type for e in result.dropped] == ["InvalidTLSVersion"]
    # ...a non-critical one then has nothing to make room with and is not queued...
    result = queue.enqueue("InvalidMessages", {"type": "x"}, critical=False, cap=cap)
    assert result.queued is None and result.dropped == ()
    # ...and a critical one is queued over the cap.
    result = queue.enqueue("TamperDetectionActivated", {"type": "x"}, critical=True, cap=cap)
    assert result.queued is not None and result.dropped == ()
    assert [e.event_type for e in queue.pending()] == [
        "StartupOfTheDevice",
        "SettingSystemTime",
        "FirmwareUpdated",
        "ResetOrReboot",
        "TamperDetectionActivated",
    ]


def test_a_flood_under_the_cap_keeps_every_critical_event_in_order(
    queue: SecurityEventQueue,
) -> None:
    critical = [f"c{n}" for n in range(30)]
    for n in range(300):
        if n % 10 == 0:
            queue.enqueue("ResetOrReboot", {"n": critical[n // 10]}, critical=True, cap=50)
        queue.enqueue("InvalidMessages", {"n": n}, critical=False, cap=50)
    pending = queue.pending()
    assert len(pending) == 50
    assert [e.payload["n"] for e in pending if e.critical] == critical
    kept = [e.payload["n"] for e in pending if not e.critical]
    assert kept == list(range(300 - 20, 300))  # the newest 20 non-critical
    assert [e.seq for e in pending] == sorted(e.seq for e in pending)


def test_failed_counts_attempts_then_gives_up_into_the_kept_dead(
    queue: SecurityEventQueue,
) -> None:
    seq = enqueue(queue, "FirmwareUpdated")
    assert seq is not None
    assert not queue.failed(seq, "InternalError: busy", max_attempts=2)
    (pending,) = queue.pending()
    assert (pending.attempts, pending.last_error) == (1, "InternalError: busy")
    assert queue.failed(seq, "InternalError: still busy", max_attempts=2)
    assert queue.pending() == []
    (dead,) = queue.dead()
    assert (dead.event_type, dead.critical, dead.attempts) == ("FirmwareUpdated", True, 2)
    assert dead.reason == "InternalError: still busy"
    assert queue.failed(seq, "again", max_attempts=2)  # gone: nothing to count
    for _ in range(SECURITY_DEAD_KEEP + 5):
        s = enqueue(queue, "InvalidMessages")
        assert s is not None
        queue.failed(s, "NotImplemented: no", max_attempts=1)
    dead_kept = queue.dead(1000)
    assert len(dead_kept) == SECURITY_DEAD_KEEP
    assert dead_kept[0].event_type == "InvalidMessages"  # the oldest went first


def test_refusals_name_what_is_wrong(queue: SecurityEventQueue) -> None:
    with pytest.raises(QueueError, match=r"1\.\.50 characters"):
        queue.enqueue("x" * 51, {}, critical=False, cap=10)
    with pytest.raises(QueueError, match="cap 0"):
        queue.enqueue("InvalidMessages", {}, critical=False, cap=0)
    with pytest.raises(QueueError, match="not JSON"):
        queue.enqueue("InvalidMessages", {"x": float("nan")}, critical=False, cap=10)
    queue.close()
    with pytest.raises(QueueError, match="closed"):
        queue.head()


# -- emit ------------------------------------------------------------------------------


def test_emit_logs_at_once_and_queues_a_valid_notification(
    queue: SecurityEventQueue, caplog: pytest.LogCaptureFixture
) -> None:
    events = SecurityEvents(queue, wall_clock=Ticks())
    with caplog.at_level(logging.INFO, logger="evse.security"):
        events.emit("StartupOfTheDevice", "firmware 1.2.3")
        events("InvalidCentralSystemCertificate", "x" * 300)
        events.emit("InvalidMessages")
        # The record is written by emit itself, before the queue has it.
        assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
            ("evse.security", "INFO", "StartupOfTheDevice (critical): firmware 1.2.3"),
            ("evse.security", "WARNING", f"InvalidCentralSystemCertificate: {'x' * 300}"),
            ("evse.security", "WARNING", "InvalidMessages"),
        ]
    assert events.flush(timeout=10)
    events.close()
    first, second, third = queue.pending()
    # No charge point yet: the time is marked for CentralClock.prepare.
    assert first.payload == {
        "type": "StartupOfTheDevice",
        "timestamp": "2026-04-01T09:00:01.000Z",
        "techInfo": "firmware 1.2.3",
        UNSYNCED: first.payload[UNSYNCED],
    }
    assert first.critical and not second.critical
    assert second.payload["techInfo"] == "x" * 255
    assert "techInfo" not in third.payload
    clock = CentralClock(lambda: T0)
    clock.set("2026-04-01T09:00:00.000Z")  # the central system's time: ours + 0
    for event in (first, second, third):
        sent = clock.prepare("SecurityEventNotification", dict(event.payload))
        validate_request("SecurityEventNotification", sent)
    with pytest.raises(ValueError, match=r"1\.\.50"):
        events.emit("")


def test_with_the_central_systems_clock_the_time_is_its_time(queue: SecurityEventQueue) -> None:
    clock = CentralClock(lambda: T0)
    clock.set("2026-04-01T10:00:00.000Z")  # one hour ahead of ours
    with SecurityEvents(queue, wall_clock=lambda: T0, clock=clock) as events:
        events.emit("SettingSystemTime")
    (event,) = queue.pending()
    assert event.payload == {"type": "SettingSystemTime", "timestamp": "2026-04-01T10:00:00.000Z"}


def test_emit_never_waits_for_the_file_and_keeps_the_order_of_each_thread(
    db: Path, queue: SecurityEventQueue
) -> None:
    # Another connection holds the write lock: emit still returns at once.
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    events = SecurityEvents(queue)
    try:
        events.emit("StartupOfTheDevice")
        assert not events.flush(timeout=0.05)  # not on disk yet: the lock is held
    finally:
        blocker.execute("COMMIT")
        blocker.close()

    def burst(tag: str) -> None:
        for n in range(25):
            events.emit("InvalidMessages", f"{tag}{n}")

    threads = [threading.Thread(target=burst, args=(tag,)) for tag in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events.close()
    infos = [e.payload.get("techInfo") for e in queue.pending()]
    assert infos[0] is None and len(infos) == 51
    for tag in "ab":
        assert [i for i in infos if i and i.startswith(tag)] == [f"{tag}{n}" for n in range(25)]


def test_close_writes_what_is_left_and_later_events_are_only_logged(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with SecurityEventQueue.open(db) as q:
        events = SecurityEvents(q)
        for _ in range(20):
            events.emit("ResetOrReboot")
        events.close()  # no flush: close drains
        events.close()
        with caplog.at_level(logging.ERROR, logger="ocpp16.security_events"):
            events.emit("FirmwareUpdated")
        assert "raised after close: not queued" in caplog.text
    with SecurityEventQueue.open(db) as q:
        assert [e.event_type for e in q.pending()] == ["ResetOrReboot"] * 20


def test_the_cap_is_logged_for_each_event_dropped(
    queue: SecurityEventQueue, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ocpp16.security_events"):
        with SecurityEvents(queue, cap=2) as events:
            events.emit("InvalidMessages", "one")
            events.emit("StartupOfTheDevice")
            events.emit("InvalidMessages", "two")  # drops "one"
            events.emit("ResetOrReboot")  # drops "two"
            events.emit("InvalidMessages", "three")  # not queued: only critical ones left
        assert events.dropped == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "ocpp16.security_events"]
    assert len(messages) == 3
    assert "InvalidMessages of" in messages[0] and "dropped (not critical)" in messages[0]
    assert messages[2].endswith("InvalidMessages not queued")
    assert [e.event_type for e in queue.pending()] == ["StartupOfTheDevice", "ResetOrReboot"]


def test_a_change_of_a_security_parameter_is_an_event_naming_the_key_only(
    db: Path, queue: SecurityEventQueue
) -> None:
    store = Store.open(db)
    try:
        config = Configuration(store)
        key = "0123456789abcdef0123456789abcdef"
        with SecurityEvents(queue) as events:
            unsubscribe = events.watch_configuration(config)
            assert config.change("AuthorizationKey", key, source="installer").ok
            assert config.change("CpoName", "Example CPO", source="installer").ok
            assert config.change("HeartbeatInterval", "600", source="installer").ok  # not one
            unsubscribe()
            assert config.change("CpoName", "Other CPO", source="installer").ok
        infos = [(e.event_type, e.payload.get("techInfo")) for e in queue.pending()]
        assert infos == [
            ("ReconfigurationOfSecurityParameters", "AuthorizationKey changed"),
            ("ReconfigurationOfSecurityParameters", "CpoName changed"),
        ]
        assert all(key not in json.dumps(e.payload) for e in queue.pending())
    finally:
        store.close()


# -- delivery through a charge point session ---------------------------------------------


@dataclass
class EventsProfile:
    """A registered profile that only runs the sender (as the integrator will)."""

    events: SecurityEvents
    cp: ChargePoint
    name: str = "SecurityEventsUnderTest"
    handlers: Mapping[str, Handler] = field(default_factory=dict)

    def tasks(self) -> Sequence[Task]:
        return (self.events.task(self.cp),)


def with_events(rig: Rig, db: Path) -> tuple[SecurityEvents, SecurityEventQueue]:
    queue = SecurityEventQueue.open(db)
    events = SecurityEvents(queue)
    rig.cp.register(EventsProfile(events, rig.cp))
    return events, queue


async def flushed(events: SecurityEvents) -> None:
    # In a worker thread: the rig's autojump does not move time meanwhile.
    assert await trio.to_thread.run_sync(events.flush, 10.0)


async def next_event(cs: CentralSystem) -> Any:
    return await cs.expect("SecurityEventNotification")


async def test_events_raised_offline_go_in_order_after_the_boot_and_after_a_reconnect(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        events, queue = with_events(rig, tmp_path / "station.db")
        try:
            # Offline, before the first connection (the charge point has no clock yet).
            events.emit("StartupOfTheDevice", "boot 1")
            events.emit("InvalidCentralSystemCertificate", "hostname mismatch")
            events.emit("FailedToAuthenticateAtCentralSystem", "HTTP 401")
            await flushed(events)
            cs = await rig.connect()
            first = await next_event(cs)
            # Nothing before the registration (OCPP 1.6 4.2.1).
            assert cs.actions().index("BootNotification") < cs.actions().index(
                "SecurityEventNotification"
            )
            assert first.payload["type"] == "StartupOfTheDevice"
            assert first.payload["techInfo"] == "boot 1"
            assert UNSYNCED not in first.payload  # stripped and corrected before sending
            cs.answer(first, {})
            second = await next_event(cs)
            assert second.payload["type"] == "InvalidCentralSystemCertificate"
            # The connection is lost while the second is in flight: it stays at the head.
            await trio.sleep(5)
            cs.conn.drop()
            await settle(lambda: rig.session_ends, "session ended")
            assert rig.session_ends[0][1].startswith("lost")
            events.emit("ResetOrReboot", "raised offline")
            await flushed(events)
            (head, *rest) = queue.pending()
            assert (head.unique_id, head.attempts) == (second.unique_id, 0)
            assert [e.event_type for e in rest] == [
                "FailedToAuthenticateAtCentralSystem",
                "ResetOrReboot",
            ]

            await trio.sleep(100)
            cs2 = await rig.connect()
            again = await next_event(cs2)
            assert again.unique_id == second.unique_id  # the same message, sent again
            assert again.payload == second.payload
            cs2.answer(again, {})
            third = await next_event(cs2)
            assert third.payload["type"] == "FailedToAuthenticateAtCentralSystem"
            cs2.answer(third, {})
            fourth = await next_event(cs2)
            assert (fourth.payload["type"], fourth.payload["techInfo"]) == (
                "ResetOrReboot",
                "raised offline",
            )
            cs2.answer(fourth, {})
            await settle(lambda: queue.pending_count() == 0, "all delivered")

            # Online, an event is sent as soon as it is on disk.
            at = trio.current_time()
            events.emit("SettingSystemTime")
            await flushed(events)
            now = await next_event(cs2)
            assert now.payload["type"] == "SettingSystemTime"
            assert trio.current_time() == at
            cs2.answer(now, {})
            await settle(lambda: queue.pending_count() == 0, "delivered")
        finally:
            events.close()
            queue.close()


async def test_a_central_system_without_the_extension_costs_one_attempt_per_event(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {"TransactionMessageAttempts": "2", "TransactionMessageRetryInterval": "10"}
    async with open_rig(tmp_path, clock, settings=settings) as rig:
        events, queue = with_events(rig, tmp_path / "station.db")
        try:
            events.emit("StartupOfTheDevice")
            events.emit("FirmwareUpdated", "1.2.4")
            events.emit("InvalidMessages")
            await flushed(events)
            cs = await rig.connect()
            # NotImplemented: asking again cannot help, the next event goes.
            first = await next_event(cs)
            cs.error(first, "NotImplemented", "unknown action")
            # Another refusal is retried after the interval, up to the attempts.
            second = await next_event(cs)
            assert second.payload["type"] == "FirmwareUpdated"
            t = trio.current_time()
            cs.error(second, "InternalError", "busy")
            retry = await next_event(cs)
            assert retry.unique_id == second.unique_id
            assert trio.current_time() == t + 10
            cs.error(retry, "InternalError", "still busy")
            third = await next_event(cs)
            assert third.payload["type"] == "InvalidMessages"
            cs.answer(third, {})
            await settle(lambda: queue.pending_count() == 0, "queue empty")
            assert [(d.event_type, d.attempts, d.reason) for d in queue.dead()] == [
                ("StartupOfTheDevice", 1, "NotImplemented: unknown action"),
                ("FirmwareUpdated", 2, "InternalError: still busy"),
            ]
            assert events.given_up == 2
            assert rig.session_ends == []
        finally:
            events.close()
            queue.close()
