"""Child process for the kill -9 test in test_journal.py.

``python journal_crash_child.py DB``: the station's store, queue and OCPP port
on one file, as ``evse run`` opens them; then transactions k = 1, 2, ... are
begun, given two readings (the second with a MeterValues queued in the same
commit) and ended, each through the port's journal, until killed. A line
``begun <id>`` / ``ended <id>`` is printed and flushed after the commit.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

from evse.ocpp_port import OcppPort
from evse.store import Store
from ocpp16.chargepoint import Identity
from ocpp16.config import Configuration
from ocpp16.queue import TransactionQueue

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IDENTITY = Identity(vendor="test", model="crash", serial="CRASH-1", firmware_version="0")


def open_port(path: str) -> tuple[Store, TransactionQueue, OcppPort]:
    store = Store.open(path)
    queue = TransactionQueue.open(path)
    port = OcppPort(config=Configuration(store), queue=queue, identity=IDENTITY)
    return store, queue, port


def main(path: str) -> None:
    store, queue, port = open_port(path)
    energy = 1000.0
    at = BASE
    for _ in range(1_000_000):
        record = store.begin_transaction(
            connector_id=1,
            id_tag="CRASH",
            meter_start_wh=energy,
            started_at=at,
            journal=port.journal(),
        )
        print(f"begun {record.id}", flush=True)
        for step in range(2):
            energy += 10.0
            at += timedelta(seconds=1)
            payload = {"connectorId": 1, "meterValue": [{"timestamp": "x", "sampledValue": []}]}

            def meter_values(conn: object, tx: int = record.id, body: dict = payload) -> None:  # type: ignore[type-arg]
                queue.enqueue_on(conn, "MeterValues", body, local_tx_id=tx)  # type: ignore[arg-type]

            store.record_meter(record.id, energy, at, then=meter_values if step else None)
        energy += 1.0
        at += timedelta(seconds=1)
        store.end_transaction(
            record.id,
            reason="Local",
            meter_stop_wh=energy,
            stopped_at=at,
            journal=port.journal(ending=record.id, stopped_at=at),
        )
        print(f"ended {record.id}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
