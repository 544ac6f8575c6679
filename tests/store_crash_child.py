"""Child process for the kill -9 test in test_store.py.

``python store_crash_child.py DB``: opens the store, begins a transaction on
connector 1, then records readings k = 1, 2, ... until killed. Reading k is
``reading(k)`` below (energy and time both rise with k), so the parent can
tell from a stored reading which k it was. A line ``recorded <wh> <iso>`` is
printed and flushed only after ``record_meter`` has returned.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

from evse.store import Store, to_text

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
START_WH = 1000.0
STEP_WH = 0.5  # exact in binary, so k can be recovered from the stored energy
LIMIT = 1_000_000  # never reached: the parent kills the child long before


def reading(k: int) -> tuple[float, datetime]:
    return START_WH + STEP_WH * k, BASE + timedelta(milliseconds=100 * k)


def main(path: str) -> None:
    store = Store.open(path)
    record = store.begin_transaction(
        connector_id=1, id_tag="CRASH", meter_start_wh=START_WH, started_at=BASE
    )
    print(f"started {record.id}", flush=True)
    for k in range(1, LIMIT):
        energy, at = reading(k)
        store.record_meter(record.id, energy, at)
        print(f"recorded {energy!r} {to_text(at)}", flush=True)
    store.close()


if __name__ == "__main__":
    main(sys.argv[1])
