"""A transaction's record and its OCPP messages in one SQLite commit (rule 2).

The store writes the record, the OCPP port's journal queues the message on the
store's connection inside the same transaction: no crash can fall between
them. Real SQLite files; the kill -9 test runs a real child process.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evse.errors import StoreError
from evse.ocpp_port import OcppPort
from evse.store import Store, TransactionRecord
from ocpp16.queue import TransactionQueue
from tests import journal_crash_child as child

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[Store, TransactionQueue, OcppPort]]:
    store, queue, port = child.open_port(str(tmp_path / "station.sqlite"))
    yield store, queue, port
    queue.close()
    store.close()


def actions(queue: TransactionQueue) -> list[tuple[str, int]]:
    return [(m.action, m.local_tx_id) for m in queue.pending()]


def test_start_and_its_start_transaction_are_one_commit(
    opened: tuple[Store, TransactionQueue, OcppPort],
) -> None:
    store, queue, port = opened
    record = store.begin_transaction(
        connector_id=1,
        id_tag="TAG1",
        meter_start_wh=100.0,
        started_at=at(0),
        journal=port.journal(),
    )
    assert actions(queue) == [("StartTransaction", record.id)]
    (start,) = queue.pending()
    assert start.payload["meterStart"] == 100
    assert start.payload["idTag"] == "TAG1"


def test_a_failing_journal_rolls_the_record_back(
    opened: tuple[Store, TransactionQueue, OcppPort],
) -> None:
    store, queue, port = opened

    class Broken:
        def started(self, conn: sqlite3.Connection, record: TransactionRecord) -> None:
            port.journal().started(conn, record)
            raise sqlite3.OperationalError("disk I/O error")

        def ended(self, conn: sqlite3.Connection, record: TransactionRecord) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        def unreported(self, conn: sqlite3.Connection, record: TransactionRecord) -> bool:
            return False

    with pytest.raises(StoreError, match="disk I/O error"):
        store.begin_transaction(
            connector_id=1, id_tag="T", meter_start_wh=1.0, started_at=at(0), journal=Broken()
        )
    # Neither the record nor its message: all or nothing.
    assert store.running_transaction(1) is None
    assert queue.pending() == []
    record = store.begin_transaction(
        connector_id=1, id_tag="T", meter_start_wh=1.0, started_at=at(0), journal=port.journal()
    )
    with pytest.raises(StoreError, match="disk I/O error"):
        store.end_transaction(
            record.id, reason="Local", meter_stop_wh=2.0, stopped_at=at(1), journal=Broken()
        )
    assert store.transaction(record.id).running
    assert actions(queue) == [("StartTransaction", record.id)]


def test_a_stop_never_reports_less_or_earlier_than_a_queued_meter_values(
    opened: tuple[Store, TransactionQueue, OcppPort],
) -> None:
    store, queue, port = opened
    record = store.begin_transaction(
        connector_id=1, id_tag="T", meter_start_wh=100.0, started_at=at(0), journal=port.journal()
    )
    payload = {"connectorId": 1, "meterValue": [{"timestamp": "x", "sampledValue": []}]}
    store.record_meter(
        record.id,
        150.0,
        at(30),
        then=lambda conn: queue.enqueue_on(conn, "MeterValues", payload, local_tx_id=record.id),
    )
    # A stop from an older reading (e.g. a stale poll) and a PowerLoss are both raised.
    ended = store.end_transaction(
        record.id,
        reason="Local",
        meter_stop_wh=140.0,
        stopped_at=at(20),
        journal=port.journal(ending=record.id, stopped_at=at(20)),
    )
    assert (ended.meter_stop_wh, ended.stopped_at) == (150.0, at(30))
    stop = queue.pending()[-1]
    assert stop.action == "StopTransaction"
    assert stop.payload["meterStop"] == 150
    assert actions(queue) == [
        ("StartTransaction", record.id),
        ("MeterValues", record.id),
        ("StopTransaction", record.id),
    ]


def test_power_loss_ends_with_the_meter_reading_at_restart_and_queues_the_stop(
    opened: tuple[Store, TransactionQueue, OcppPort],
) -> None:
    store, queue, port = opened
    record = store.begin_transaction(
        connector_id=1, id_tag="T", meter_start_wh=100.0, started_at=at(0), journal=port.journal()
    )
    store.record_meter(record.id, 120.0, at(10))
    # The meter outlived the process: 37 Wh flowed until the off-write at restart.
    (ended,) = store.recover_power_loss(reading=(157.0, at(70)), journal=port.journal())
    assert (ended.stop_reason, ended.meter_stop_wh, ended.stopped_at) == (
        "PowerLoss",
        157.0,
        at(70),
    )
    assert actions(queue) == [("StartTransaction", record.id), ("StopTransaction", record.id)]
    assert queue.pending()[-1].payload["reason"] == "PowerLoss"
    # A meter that answers with less (replaced, or another meter) never lowers it.
    again = store.begin_transaction(
        connector_id=1, id_tag="T", meter_start_wh=200.0, started_at=at(80), journal=port.journal()
    )
    store.record_meter(again.id, 250.0, at(90))
    (low,) = store.recover_power_loss(reading=(5.0, at(95)), journal=port.journal())
    assert (low.meter_stop_wh, low.stopped_at) == (250.0, at(95))


def test_recovery_queues_the_stop_an_older_firmware_never_queued(
    opened: tuple[Store, TransactionQueue, OcppPort],
) -> None:
    """The soak's finding: the end was written, then the process died before the
    StopTransaction was queued (older firmware did the two separately)."""
    store, queue, port = opened
    record = store.begin_transaction(
        connector_id=1, id_tag="T", meter_start_wh=100.0, started_at=at(0), journal=port.journal()
    )
    store.end_transaction(record.id, reason="Local", meter_stop_wh=130.0, stopped_at=at(60))
    standalone = store.begin_transaction(
        connector_id=1, id_tag="T", meter_start_wh=130.0, started_at=at(70)
    )
    store.end_transaction(standalone.id, reason="Local", meter_stop_wh=140.0, stopped_at=at(80))
    assert actions(queue) == [("StartTransaction", record.id)]
    assert store.recover_power_loss(journal=port.journal()) == []
    # Its stop is queued; a transaction never reported at all (standalone) is not.
    assert actions(queue) == [("StartTransaction", record.id), ("StopTransaction", record.id)]
    assert queue.pending()[-1].payload["meterStop"] == 130
    # Recovery again adds nothing.
    store.recover_power_loss(journal=port.journal())
    assert len(queue.pending()) == 2


def _killed_run(db: Path, rng: random.Random) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(Path(child.__file__)), str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(20.0, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for _ in range(rng.randint(1, 12)):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        time.sleep(rng.uniform(0, 0.01))
        proc.send_signal(signal.SIGKILL)
        proc.stdout.read()
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    finally:
        watchdog.cancel()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.slow
def test_kill_9_never_leaves_a_transaction_without_its_messages(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    db = tmp_path / "station.sqlite"
    for run in range(12):
        _killed_run(db, rng)
        store, queue, port = child.open_port(str(db))
        try:
            store.recover_power_loss(journal=port.journal())
            messages = queue.pending(limit=100_000)
            for record in store.transactions(limit=100_000):
                mine = [m.action for m in messages if m.local_tx_id == record.id]
                # Every transaction: exactly one Start first, at most one
                # MeterValues, exactly one Stop last (all of them ended now).
                assert mine[0] == "StartTransaction", (seed, run, record.id, mine)
                assert mine[-1] == "StopTransaction", (seed, run, record.id, mine)
                assert mine.count("StartTransaction") == 1, (seed, run, mine)
                assert mine.count("StopTransaction") == 1, (seed, run, mine)
                stop = next(
                    m
                    for m in messages
                    if m.local_tx_id == record.id and m.action == "StopTransaction"
                )
                assert stop.payload["meterStop"] == round(record.meter_stop_wh or 0), (seed, run)
        finally:
            queue.close()
            store.close()
