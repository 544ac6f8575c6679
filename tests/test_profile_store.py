"""Persistent charging profiles (ocpp16/profile_store.py) on real SQLite files:
round trip, TxProfiles never stored, no write for an unchanged set, clear then
reboot, rows that no longer validate, sharing the file with the store and queue."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from evse.store import Store
from ocpp16.profile_store import SCHEMA_VERSION, ProfileStore, ProfileStoreError
from ocpp16.queue import TransactionQueue
from ocpp16.smart_charging import ProfileSet, SmartChargingConfig, format_time

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def payload(
    profile_id: int,
    *,
    stack: int = 0,
    purpose: str = "TxDefaultProfile",
    limit: float = 16.0,
    kind: str = "Absolute",
) -> dict[str, Any]:
    schedule: dict[str, Any] = {
        "chargingRateUnit": "A",
        "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}],
    }
    if kind != "Relative":
        schedule["startSchedule"] = format_time(T0)
    return {
        "chargingProfileId": profile_id,
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": kind,
        "chargingSchedule": schedule,
    }


def installed(*items: tuple[int, dict[str, Any]]) -> ProfileSet:
    profiles = ProfileSet()
    for connector_id, item in items:
        result = profiles.set_profile(connector_id, item, now=T0, transactions={1: 42})
        assert result.accepted, result.reason
        profiles = result.profiles
    return profiles


FULL = installed(
    (0, payload(1, purpose="ChargePointMaxProfile", limit=20.0)),
    (0, payload(2, stack=1)),
    (1, payload(3, stack=2, kind="Relative", limit=10.0)),
    (1, payload(4, purpose="TxProfile", limit=8.0)),
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "station.db"


@pytest.fixture
def store(db: Path) -> Iterator[ProfileStore]:
    s = ProfileStore.open(db)
    yield s
    s.close()


@pytest.fixture
def raw(db: Path) -> Iterator[sqlite3.Connection]:
    """A second, independent connection to the file: sees only what was committed."""
    conn = sqlite3.connect(db, isolation_level=None)
    yield conn
    conn.close()


def data_version(conn: sqlite3.Connection) -> int:
    # Changes whenever another connection commits to the file.
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def test_round_trip_keeps_charge_point_max_and_tx_default_only(
    db: Path, raw: sqlite3.Connection
) -> None:
    with ProfileStore.open(db) as store:
        assert store.load() == ProfileSet()
        assert store.save(FULL)
    with ProfileStore.open(db) as again:
        loaded = again.load()
    assert loaded.entries == FULL.persistent()
    assert [e.profile.id for e in loaded.entries] == [1, 2, 3]
    assert loaded.limit_at(T0, 1, T0, 42) == 10.0  # the TxProfile (8 A) is gone
    assert again.dropped == ()
    purposes = {row[0] for row in raw.execute("SELECT purpose FROM ocpp_charging_profiles")}
    assert purposes == {"ChargePointMaxProfile", "TxDefaultProfile"}


def test_an_unchanged_set_writes_nothing(
    db: Path, store: ProfileStore, raw: sqlite3.Connection
) -> None:
    store.load()
    assert store.save(FULL)
    assert store.writes == 1
    before = data_version(raw)
    assert store._conn is not None
    changes = store._conn.total_changes
    # The same set, an equal one rebuilt from the same payloads, and one that
    # differs only in its TxProfiles: nothing to write.
    assert not store.save(FULL)
    assert not store.save(
        installed(
            (0, payload(1, purpose="ChargePointMaxProfile", limit=20.0)),
            (0, payload(2, stack=1)),
            (1, payload(3, stack=2, kind="Relative", limit=10.0)),
        )
    )
    assert not store.save(FULL.transaction_ended(1, 42))
    assert store.writes == 1
    assert store._conn.total_changes == changes
    assert data_version(raw) == before
    # After a restart the loaded set is what the file holds: still no write.
    store.close()
    with ProfileStore.open(db) as reopened:
        assert not reopened.save(reopened.load())
        assert reopened.writes == 0
    assert data_version(raw) == before


def test_a_change_rewrites_only_the_rows_that_differ(db: Path, store: ProfileStore) -> None:
    store.load()
    store.save(FULL)
    assert store._conn is not None
    changes = store._conn.total_changes
    changed = FULL.set_profile(0, payload(2, stack=1, limit=12.0), now=T0).profiles
    assert store.save(changed)
    assert store._conn.total_changes == changes + 1
    with ProfileStore.open(db) as again:
        assert again.load().get(2) == changed.get(2)


def test_clear_then_reboot_stays_cleared(db: Path, raw: sqlite3.Connection) -> None:
    with ProfileStore.open(db) as store:
        assert len(store.load()) == 0
        store.save(FULL)
        one = FULL.clear(profile_id=1)
        assert one.conf() == {"status": "Accepted"}
        store.save(one.profiles)
    with ProfileStore.open(db) as store:
        after_one = store.load()
        assert [e.profile.id for e in after_one.entries] == [2, 3]
        everything = after_one.clear()
        store.save(everything.profiles)
    with ProfileStore.open(db) as store:
        assert len(store.load()) == 0
    assert raw.execute("SELECT count(*) FROM ocpp_charging_profiles").fetchone()[0] == 0


def test_tx_profiles_cannot_be_stored_even_by_hand(
    db: Path, store: ProfileStore, raw: sqlite3.Connection
) -> None:
    row = json.dumps(payload(9, purpose="TxProfile"))
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        raw.execute("INSERT INTO ocpp_charging_profiles VALUES (9, 1, 'TxProfile', ?)", (row,))


def test_rows_that_no_longer_validate_are_dropped_and_removed_on_save(
    db: Path, raw: sqlite3.Connection
) -> None:
    with ProfileStore.open(db) as store:
        store.save(installed((0, payload(1, stack=5)), (0, payload(2, stack=1))))
    raw.execute(
        "INSERT INTO ocpp_charging_profiles VALUES (3, 0, 'TxDefaultProfile', '{\"x\": 1}')"
    )
    raw.execute(
        "INSERT INTO ocpp_charging_profiles VALUES (4, 0, 'TxDefaultProfile', ?)",
        (json.dumps(payload(5, stack=2)),),
    )
    # A firmware with a lower ChargeProfileMaxStackLevel: level 5 no longer fits.
    config = SmartChargingConfig(max_stack_level=3)
    with ProfileStore.open(db) as store:
        loaded = store.load(config)
        assert [e.profile.id for e in loaded.entries] == [2]
        assert [pid for pid, _ in store.dropped] == [1, 3, 4]
        assert "ChargeProfileMaxStackLevel" in store.dropped[0][1]
        assert store.save(loaded)
    ids = [row[0] for row in raw.execute("SELECT charging_profile_id FROM ocpp_charging_profiles")]
    assert ids == [2]


def test_a_valid_but_non_canonical_row_is_rewritten_once(db: Path, raw: sqlite3.Connection) -> None:
    with ProfileStore.open(db):
        pass
    text = json.dumps(payload(1), indent=2)  # valid, but not the canonical text
    raw.execute("INSERT INTO ocpp_charging_profiles VALUES (1, 0, 'TxDefaultProfile', ?)", (text,))
    with ProfileStore.open(db) as store:
        loaded = store.load()
        assert len(loaded) == 1 and store.dropped == ()
        assert store.save(loaded)
        assert not store.save(loaded)


def test_shares_the_station_file_with_the_store_and_the_queue(
    db: Path, raw: sqlite3.Connection
) -> None:
    with Store.open(db) as station, ProfileStore.open(db) as store:
        station.set_setting("ocpp.HeartbeatInterval", "60")
        store.save(FULL)
        with TransactionQueue.open(db) as queue:
            assert queue.schema_version >= 1
    with TransactionQueue.open(db) as queue, ProfileStore.open(db) as store:
        assert len(store.load()) == 3
    versions = dict(raw.execute("SELECT key, value FROM ocpp_meta"))
    assert versions["charging_profiles_schema_version"] == SCHEMA_VERSION
    assert "schema_version" in versions
    assert str(raw.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"


def test_errors(db: Path, tmp_path: Path, raw: sqlite3.Connection) -> None:
    with pytest.raises(ProfileStoreError, match="directory does not exist"):
        ProfileStore.open(tmp_path / "missing" / "station.db")
    with pytest.raises(ProfileStoreError, match="is a directory"):
        ProfileStore.open(tmp_path)
    store = ProfileStore.open(db)
    store.close()
    store.close()
    with pytest.raises(ProfileStoreError, match="closed"):
        store.load()
    raw.execute(
        "UPDATE ocpp_meta SET value = ? WHERE key = 'charging_profiles_schema_version'",
        (SCHEMA_VERSION + 1,),
    )
    with pytest.raises(ProfileStoreError, match="newer"):
        ProfileStore.open(db)
    not_sqlite = tmp_path / "junk.db"
    not_sqlite.write_bytes(b"not a database" * 100)
    with pytest.raises(ProfileStoreError):
        ProfileStore.open(not_sqlite)


def test_expired_profile_stays_until_a_save_without_it(db: Path) -> None:
    short = payload(1)
    short["validTo"] = format_time(T0 + timedelta(hours=1))
    with ProfileStore.open(db) as store:
        store.save(installed((0, short)))
    with ProfileStore.open(db) as store:
        loaded = store.load()
        assert loaded.limit_at(T0 + timedelta(hours=2), 1) is None
        later = loaded.set_profile(0, payload(2, stack=1), now=T0 + timedelta(hours=2))
        assert later.removed == (1,)
        store.save(later.profiles)
    with ProfileStore.open(db) as store:
        assert [e.profile.id for e in store.load().entries] == [2]
