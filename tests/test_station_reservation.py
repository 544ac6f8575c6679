"""Reservations in the station (OCPP 1.6 5.13), on the virtual clock: the answers
of ``Station.reserve``, the expiry on trio's clock, the reservation id in the
record of the transaction it leads to, the parent lookup, and the reservation
kept in the station's SQLite file across a restart until its expiry.

The whole station runs in ``tests/vclock_rig.py``. ``Station.reserve`` takes
its expiry on the wall clock (the OCPP side converts the central system's
time): the wall clock does not follow the virtual one, so expiries are
asserted to within a second.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
import trio.testing

from evse.auth import AuthStatus, LocalTagList
from evse.connector import Status
from evse.station import RESERVATION_KEY
from evse.store import Store
from evse.supervisor import Plan
from tests.vclock_rig import TAG, VRig, vclock_rig

KEY = RESERVATION_KEY.format(1)


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def with_tags(plan: Plan) -> Plan:
    """TAG and OTHER1 accepted locally (CHILD1 too: without a parent)."""
    tags = {TAG: AuthStatus.ACCEPTED, "OTHER1": AuthStatus.ACCEPTED, "CHILD1": AuthStatus.ACCEPTED}
    return replace(plan, auth_steps=[LocalTagList(tags)])


def stored(rig: VRig) -> dict[str, object] | None:
    rows = rig.db_rows(f"SELECT value FROM settings WHERE key = '{KEY}'")
    return json.loads(rows[0][0]) if rows else None


def reported(rig: VRig, since: float = 0.0) -> list[Status]:
    return [status for _, status, _ in rig.central.statuses(since)]


async def test_a_reservation_expires_on_trios_clock_and_reports_available(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path) as rig:
        made = trio.current_time()
        assert await rig.station.reserve(7, TAG, later(60)) == "Accepted"
        assert rig.station.connector.status is Status.RESERVED
        assert stored(rig) == {
            "reservation_id": 7,
            "id_tag": TAG,
            "parent_id_tag": None,
            "expiry": stored(rig)["expiry"],  # type: ignore[index]
        }
        expired = await rig.status("Available", within=120)
        assert abs(expired - (made + 60)) < 1.0
        await rig.until(
            lambda: reported(rig, made) == [Status.RESERVED, Status.AVAILABLE],
            what="Reserved, then Available told to the central system",
        )
        await rig.until(lambda: stored(rig) is None, what="the reservation forgotten")


async def test_the_reserved_tag_starts_with_the_reservation_id_another_tag_cannot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path, plan=with_tags) as rig:
        assert await rig.station.reserve(7, TAG, later(600)) == "Accepted"
        rig.plug()
        await rig.until(lambda: rig.station.connector.snapshot.plugged, what="plugged")
        assert rig.station.connector.status is Status.RESERVED  # waits for its tag
        other = await rig.station.present_id_tag("OTHER1")
        assert other.accepted  # a valid tag, but not this reservation's
        assert await rig.station.remote_start("OTHER1") is False
        await trio.sleep(5)
        assert rig.station.connector.status is Status.RESERVED
        assert rig.db_rows("SELECT id FROM transactions") == []
        await rig.station.present_id_tag(TAG.lower())  # CiString20: case-insensitive
        await rig.status("Charging")
        await rig.until(lambda: stored(rig) is None, what="the reservation forgotten")
        assert rig.db_rows("SELECT id_tag, reservation_id FROM transactions") == [(TAG.lower(), 7)]
        assert rig.station.tx is not None and rig.station.tx.reservation_id == 7


async def test_reserve_answers_and_a_refusal_changes_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path) as rig:
        station = rig.station
        assert await station.reserve(1, TAG, later(-1)) == "Rejected"  # expired already
        assert await station.reserve(1, TAG, later(600)) == "Accepted"
        assert await station.reserve(2, TAG, later(600)) == "Occupied"  # another reservation
        assert await station.reserve(1, TAG, later(-1)) == "Rejected"
        assert station.connector.snapshot.reservation is not None
        assert station.connector.snapshot.reservation.reservation_id == 1
        # The same id replaces it: new tag, new expiry.
        assert await station.reserve(1, "NEWTAG", later(900), "FLEET") == "Accepted"
        held = station.connector.snapshot.reservation
        assert held is not None and (held.id_tag, held.parent_id_tag) == ("NEWTAG", "FLEET")
        await rig.until(lambda: stored(rig) and stored(rig)["id_tag"] == "NEWTAG")  # type: ignore[index]
        assert await station.cancel_reservation(99) is False
        assert await station.cancel_reservation(1) is True
        assert station.connector.status is Status.AVAILABLE
        await rig.until(lambda: stored(rig) is None, what="the reservation forgotten")

        rig.plug()
        await rig.status("Preparing")
        assert await station.reserve(3, TAG, later(600)) == "Occupied"
        rig.unplug()
        await rig.status("Available")
        assert await station.set_availability(False) == "Accepted"
        assert await station.reserve(3, TAG, later(600)) == "Unavailable"
        assert await station.set_availability(True) == "Accepted"
        rig.fault("rcd_trip")
        await rig.status("Faulted")
        assert await station.reserve(3, TAG, later(600)) == "Faulted"
        assert stored(rig) is None


async def test_a_fault_ends_a_reservation_on_disk_too(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path) as rig:
        assert await rig.station.reserve(7, TAG, later(600)) == "Accepted"
        assert stored(rig) is not None
        rig.fault("rcd_trip")
        await rig.status("Faulted")
        await rig.until(lambda: stored(rig) is None, what="the reservation forgotten")


async def test_a_reservation_survives_a_restart_until_its_expiry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "station.sqlite"
    async with vclock_rig(tmp_path, db=db) as rig:
        assert await rig.station.reserve(7, TAG, later(600), "FLEET") == "Accepted"
        expiry = datetime.fromisoformat(str(stored(rig)["expiry"]))  # type: ignore[index]
    async with vclock_rig(tmp_path, db=db) as rig:
        # Held again from the start, before the central system could see Available.
        assert rig.station.connector.status is Status.RESERVED
        held = rig.station.connector.snapshot.reservation
        assert held is not None
        assert (held.reservation_id, held.id_tag, held.parent_id_tag) == (7, TAG, "FLEET")
        left = held.deadline - trio.current_time()
        assert abs(left - (expiry - datetime.now(UTC)).total_seconds()) < 1.0
        rig.plug()
        await rig.station.present_id_tag(TAG)  # its tag uses it after the restart
        await rig.status("Charging")
        assert rig.db_rows("SELECT reservation_id FROM transactions") == [(7,)]


async def test_an_expired_or_unreadable_reservation_is_dropped_at_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "station.sqlite"
    for text in (
        json.dumps(
            {
                "reservation_id": 7,
                "id_tag": TAG,
                "parent_id_tag": None,
                "expiry": later(-5).isoformat(),
            }
        ),
        "{not json",
    ):
        with Store.open(db) as store:
            store.set_setting(KEY, text)
        async with vclock_rig(tmp_path, db=db) as rig:
            assert rig.station.connector.status is Status.AVAILABLE
            assert rig.station.connector.snapshot.reservation is None
            assert stored(rig) is None


async def test_a_reservation_for_a_parent_is_used_by_a_child_tag_through_the_lookup(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    asked: list[str] = []

    async def parent_of(id_tag: str) -> str | None:
        await trio.lowlevel.checkpoint()
        asked.append(id_tag)
        return {"CHILD1": "FLEET"}.get(id_tag)

    async with vclock_rig(tmp_path, plan=with_tags) as rig:
        rig.station.parent_lookup = parent_of
        assert await rig.station.reserve(7, "PARENT1", later(600), "FLEET") == "Accepted"
        await rig.station.present_id_tag("OTHER1")  # its parent is not FLEET
        assert rig.station.connector.status is Status.RESERVED
        await rig.station.present_id_tag("CHILD1")
        await rig.status("Preparing")
        assert asked == ["OTHER1", "CHILD1"]
        rig.plug()
        await rig.status("Charging")
        assert rig.db_rows("SELECT id_tag, reservation_id FROM transactions") == [("CHILD1", 7)]


async def test_a_remote_start_by_a_child_tag_uses_the_parents_reservation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def parent_of(id_tag: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return "FLEET" if id_tag == "CHILD2" else None

    async with vclock_rig(tmp_path) as rig:
        rig.station.parent_lookup = parent_of
        assert await rig.station.reserve(7, "PARENT1", later(600), "FLEET") == "Accepted"
        assert await rig.station.remote_start("NOBODY") is False
        assert await rig.station.remote_start("CHILD2") is True
        rig.plug()
        await rig.status("Charging")
        assert rig.db_rows("SELECT reservation_id FROM transactions") == [(7,)]


def test_the_store_migrates_a_file_without_reservation_ids(tmp_path: Path) -> None:
    """Schema 2 adds ``transactions.reservation_id``: a file written at schema 1
    keeps its transactions (no reservation), new ones keep theirs."""
    import sqlite3  # noqa: PLC0415

    from evse.store import MIGRATIONS, SCHEMA_VERSION  # noqa: PLC0415

    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(db, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    at = "2026-01-01T00:00:00.000000Z"
    conn.execute(
        "INSERT INTO transactions (connector_id, id_tag, meter_start_wh, started_at,"
        " last_meter_wh, last_meter_at) VALUES (1, 'OLD', 0, ?, 0, ?)",
        (at, at),
    )
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with Store.open(db) as store:
        assert store.schema_version == SCHEMA_VERSION >= 2
        (old,) = store.transactions()
        assert (old.id_tag, old.reservation_id) == ("OLD", None)
        store.end_transaction(old.id, reason="Local", meter_stop_wh=1.0, stopped_at=later(0))
        new = store.begin_transaction(
            connector_id=1, id_tag="NEW", meter_start_wh=2.0, started_at=later(0), reservation_id=7
        )
        assert store.transaction(new.id).reservation_id == 7
