"""Timestamps taken before the central system set the clock are corrected, never sent raw."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from evse.store import Store
from ocpp16.chargepoint import ChargePoint, Identity
from ocpp16.clock import BOOT_ID, UNSYNCED
from ocpp16.config import Configuration
from ocpp16.metering import format_time
from ocpp16.queue import TransactionQueue

AT = datetime(1970, 1, 1, 0, 10, tzinfo=UTC)  # a board without a real-time clock


@pytest.fixture
def chargepoint(tmp_path: Path) -> Iterator[ChargePoint]:
    db = tmp_path / "station.sqlite"
    with Store.open(db) as store, TransactionQueue.open(db) as queue:
        cp = ChargePoint(
            config=Configuration(store),
            queue=queue,
            station=None,  # type: ignore[arg-type]  # not used by these paths
            identity=Identity("v", "m", "s", "1"),
            connection_settings=lambda: None,
        )
        yield cp


def queued(cp: ChargePoint) -> list[dict[str, Any]]:
    return [dict(m.payload) for m in cp.queue.pending()]


async def test_times_before_the_clock_is_set_are_corrected_when_it_is(
    chargepoint: ChargePoint,
) -> None:
    cp = chargepoint
    await cp.transaction_started(
        local_id=1, connector_id=1, id_tag="TAG", meter_start_wh=0, timestamp=AT
    )
    (start,) = queued(cp)
    assert start[UNSYNCED] == BOOT_ID
    assert start["timestamp"] == "1970-01-01T00:10:00.000Z"
    # The central system's answer sets the clock: 2026, not 1970.
    now = datetime.now(UTC)
    cp.set_clock("2026-11-22T12:00:00Z")
    assert cp.synced_offset is not None
    sent = cp._prepare("StartTransaction", dict(start))
    assert UNSYNCED not in sent
    corrected = datetime.fromisoformat(sent["timestamp"].replace("Z", "+00:00"))
    expected = AT + (datetime(2026, 11, 22, 12, tzinfo=UTC) - now)
    assert abs(corrected - expected) < timedelta(seconds=1)
    # After that, station times are converted as they are taken.
    await cp.transaction_ended(
        local_id=1,
        connector_id=1,
        id_tag="TAG",
        meter_start_wh=0,
        started_at=AT,
        meter_stop_wh=10,
        stopped_at=AT + timedelta(minutes=5),
        reason="Local",
        stop_id_tag=None,
    )
    stop = queued(cp)[-1]
    assert UNSYNCED not in stop
    assert cp.clock_offset is not None
    assert stop["timestamp"] == format_time(AT + timedelta(minutes=5) + cp.clock_offset)


async def test_a_time_from_an_earlier_boot_is_sent_as_recorded(chargepoint: ChargePoint) -> None:
    cp = chargepoint
    cp.set_clock("2026-11-22T12:00:00Z")
    payload = {"timestamp": "1970-01-01T00:10:00.000Z", UNSYNCED: "another-boot"}
    sent = cp._prepare("StopTransaction", payload)
    assert sent == {"timestamp": "1970-01-01T00:10:00.000Z"}
