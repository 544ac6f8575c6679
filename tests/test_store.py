"""The station's SQLite store, on real files: pragmas, schema, round trips,
refusals, settings atomicity, power-loss recovery and a real kill -9."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from evse.errors import EvseError, StoreError
from evse.store import SCHEMA_VERSION, Store, TransactionRecord, from_text, to_text
from tests import store_crash_child as child

T0 = datetime(2026, 5, 1, 8, 30, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "station.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store.open(db)
    yield s
    s.close()


def raw(path: Path) -> sqlite3.Connection:
    """A second, independent connection: sees only what was committed."""
    return sqlite3.connect(path, isolation_level=None)


def begin(
    store: Store, connector_id: int = 1, wh: float = 1000.0, t: float = 0
) -> TransactionRecord:
    return store.begin_transaction(
        connector_id=connector_id, id_tag="TAG1", meter_start_wh=wh, started_at=at(t)
    )


# -- opening, pragmas, schema ---------------------------------------------------


def test_open_sets_and_verifies_wal_full_sync_and_foreign_keys(store: Store, db: Path) -> None:
    assert store.pragmas() == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "foreign_keys": 1,
        "user_version": SCHEMA_VERSION,
    }
    assert store.schema_version == SCHEMA_VERSION >= 1
    # WAL is a property of the file: another connection sees it too.
    conn = raw(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"settings", "transactions"} <= tables
    finally:
        conn.close()


def test_a_file_that_cannot_run_in_wal_mode_is_refused() -> None:
    # An in-memory database answers "memory" to journal_mode=WAL.
    with pytest.raises(StoreError, match="cannot enable WAL") as info:
        Store.open(":memory:")
    assert info.value.path == ":memory:"


def test_a_missing_directory_is_refused_and_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(StoreError, match="does not exist") as info:
        Store.open(missing / "station.db")
    assert info.value.path == str(missing)
    assert str(missing) in str(info.value)
    assert not missing.exists()  # refused, not created


def test_a_directory_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory") as info:
        Store.open(tmp_path)
    assert info.value.path == str(tmp_path)


def test_a_file_that_is_not_a_database_is_refused_and_named(db: Path) -> None:
    db.write_bytes(b"this is not an SQLite file " * 200)
    with pytest.raises(StoreError, match="not a database") as info:
        Store.open(db)
    assert info.value.path == str(db)
    assert str(info.value).startswith(f"{db}: ")
    assert isinstance(info.value, EvseError)
    assert isinstance(info.value.__cause__, sqlite3.Error)


def test_a_damaged_page_is_found_on_open(db: Path) -> None:
    with Store.open(db) as s:
        s.set_settings({f"key{i}": "v" * 200 for i in range(200)})
    page = 4096
    assert db.stat().st_size > 8 * page
    with db.open("r+b") as f:
        f.seek(5 * page)
        f.write(b"\xff" * page)
    with pytest.raises(StoreError) as info:
        Store.open(db)
    assert info.value.path == str(db)


def test_reopen_keeps_data_and_does_not_migrate_again(db: Path) -> None:
    with Store.open(db) as s:
        s.set_setting("k", "v")
        tx = begin(s)
    with Store.open(db) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert s.get_setting("k") == "v"
        assert s.transaction(tx.id) == tx


def test_a_newer_schema_is_refused(db: Path) -> None:
    Store.open(db).close()
    conn = raw(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this firmware"):
        Store.open(db)


def test_a_failed_migration_leaves_the_file_as_it_was(db: Path) -> None:
    # A file at version 0 with a table in the way of the first migration's
    # second statement: the first statement must be rolled back with it.
    conn = raw(db)
    conn.execute("CREATE TABLE transactions (x)")
    conn.close()
    with pytest.raises(StoreError, match="migrate"):
        Store.open(db)
    conn = raw(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"transactions"}
    finally:
        conn.close()


def test_a_closed_store_refuses_and_closing_twice_is_harmless(db: Path) -> None:
    with Store.open(db) as s:
        pass
    with pytest.raises(StoreError, match="closed"):
        s.get_setting("k")
    with pytest.raises(StoreError, match="closed"):
        begin(s)
    s.close()


# -- transactions ---------------------------------------------------------------


def test_transaction_round_trip(db: Path) -> None:
    with Store.open(db) as s:
        started = begin(s, connector_id=2, wh=1234.5, t=0)
        assert started == TransactionRecord(
            id=started.id,
            connector_id=2,
            id_tag="TAG1",
            meter_start_wh=1234.5,
            started_at=at(0),
            last_meter_wh=1234.5,
            last_meter_at=at(0),
            stop_reason=None,
            meter_stop_wh=None,
            stopped_at=None,
            stop_id_tag=None,
        )
        assert started.running
        assert s.running_transaction(2) == started
        assert s.running_transaction(1) is None

        s.record_meter(started.id, 1300.25, at(60))
        current = s.transaction(started.id)
        assert (current.last_meter_wh, current.last_meter_at) == (1300.25, at(60))
        assert (current.meter_start_wh, current.started_at) == (1234.5, at(0))

        ended = s.end_transaction(
            started.id, reason="Remote", meter_stop_wh=1400.0, stopped_at=at(90), id_tag="TAG2"
        )
        assert not ended.running
        assert (ended.stop_reason, ended.meter_stop_wh, ended.stopped_at, ended.stop_id_tag) == (
            "Remote",
            1400.0,
            at(90),
            "TAG2",
        )
        # The stop reading is the last persisted reading.
        assert (ended.last_meter_wh, ended.last_meter_at) == (1400.0, at(90))
        assert s.running_transaction(2) is None
    with Store.open(db) as s:
        assert s.transaction(started.id) == ended


def test_every_write_is_committed_before_the_method_returns(store: Store, db: Path) -> None:
    # A second connection only sees committed data; nothing may be left in an
    # open transaction on the store's connection.
    other = raw(db)
    try:
        tx = begin(store)
        row = other.execute("SELECT last_meter_wh FROM transactions WHERE id=?", (tx.id,))
        assert row.fetchone() == (1000.0,)
        store.record_meter(tx.id, 1010.0, at(1))
        row = other.execute("SELECT last_meter_wh FROM transactions WHERE id=?", (tx.id,))
        assert row.fetchone() == (1010.0,)
        store.end_transaction(tx.id, reason="Local", meter_stop_wh=1020.0, stopped_at=at(2))
        row = other.execute("SELECT stop_reason FROM transactions WHERE id=?", (tx.id,))
        assert row.fetchone() == ("Local",)
        store.set_setting("a", "1")
        assert other.execute("SELECT value FROM settings WHERE key='a'").fetchone() == ("1",)
        store.delete_setting("a")
        assert other.execute("SELECT value FROM settings WHERE key='a'").fetchone() is None
    finally:
        other.close()


def test_times_are_stored_as_utc_text_with_z_and_read_back_aware(store: Store, db: Path) -> None:
    cest = timezone(timedelta(hours=2))
    local = datetime(2026, 7, 1, 10, 15, 30, 123456, tzinfo=cest)
    tx = store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0.0, started_at=local)
    assert tx.started_at == local
    assert tx.started_at.tzinfo is UTC
    assert tx.started_at.hour == 8
    conn = raw(db)
    try:
        text = conn.execute("SELECT started_at FROM transactions").fetchone()[0]
    finally:
        conn.close()
    assert text == "2026-07-01T08:15:30.123456Z"


def test_naive_times_are_refused(store: Store) -> None:
    naive = datetime(2026, 7, 1, 10, 0)
    with pytest.raises(StoreError, match="naive"):
        store.begin_transaction(connector_id=1, id_tag="T", meter_start_wh=0.0, started_at=naive)
    assert store.transactions() == []
    tx = begin(store)
    with pytest.raises(StoreError, match="naive"):
        store.record_meter(tx.id, 1001.0, naive)
    with pytest.raises(StoreError, match="naive"):
        store.end_transaction(tx.id, reason="Local", meter_stop_wh=1001.0, stopped_at=naive)
    assert store.transaction(tx.id) == tx


@given(
    st.lists(
        st.datetimes(
            min_value=datetime(1000, 1, 2),
            max_value=datetime(9999, 12, 30),
            timezones=st.builds(timezone, st.timedeltas(timedelta(hours=-23), timedelta(hours=23))),
        ),
        min_size=2,
        max_size=2,
    )
)
def test_time_text_round_trips_and_sorts_like_the_times(times: list[datetime]) -> None:
    # The SQL CHECKs and ORDER BY compare the text: text order must be time order.
    a, b = times
    assert from_text(to_text(a)) == a
    assert (to_text(a) < to_text(b)) == (a < b)
    assert to_text(a).endswith("Z")


def test_a_second_running_transaction_on_a_connector_is_refused(store: Store) -> None:
    first = begin(store, connector_id=1)
    with pytest.raises(StoreError, match=f"transaction {first.id} is still running"):
        begin(store, connector_id=1, t=5)
    other = begin(store, connector_id=2)  # another connector is fine
    assert store.transactions() == [other, first]
    store.end_transaction(first.id, reason="Local", meter_stop_wh=1000.0, stopped_at=at(10))
    again = begin(store, connector_id=1, t=20)
    assert again.id > other.id


def test_the_file_itself_refuses_two_running_transactions_on_a_connector(
    store: Store, db: Path
) -> None:
    begin(store, connector_id=1)
    conn = raw(db)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute(
                "INSERT INTO transactions (connector_id, id_tag, meter_start_wh, started_at,"
                " last_meter_wh, last_meter_at) VALUES (1, 'X', 0, ?, 0, ?)",
                (to_text(at(1)), to_text(at(1))),
            )
    finally:
        conn.close()


def test_readings_going_backwards_are_refused_and_change_nothing(store: Store) -> None:
    tx = begin(store, wh=1000.0, t=0)
    store.record_meter(tx.id, 1100.0, at(60))
    before = store.transaction(tx.id)
    with pytest.raises(StoreError, match="before the last reading"):
        store.record_meter(tx.id, 1200.0, at(59))
    with pytest.raises(StoreError, match="below the last reading"):
        store.record_meter(tx.id, 1099.0, at(61))
    with pytest.raises(StoreError, match="below the last reading"):
        store.record_meter(tx.id, 999.0, at(61))  # below meter_start too
    assert store.transaction(tx.id) == before
    # Same time and same energy are not backwards.
    store.record_meter(tx.id, 1100.0, at(60))
    assert store.transaction(tx.id) == before


def test_a_stop_is_raised_to_the_last_reading_never_below_or_before(store: Store) -> None:
    """A stop older or lower than what was persisted (a stale reading, the wall
    clock stepped back) is raised to it: the end is written, never refused, and
    the record never goes backwards."""
    tx = begin(store, wh=1000.0, t=0)
    store.record_meter(tx.id, 1100.0, at(60))
    ended = store.end_transaction(tx.id, reason="Local", meter_stop_wh=1050.0, stopped_at=at(30))
    assert (ended.meter_stop_wh, ended.stopped_at) == (1100.0, at(60))
    assert (ended.last_meter_wh, ended.last_meter_at) == (1100.0, at(60))


def test_a_reading_before_the_start_is_refused(store: Store) -> None:
    tx = begin(store, wh=1000.0, t=100)
    with pytest.raises(StoreError, match="before the last reading"):
        store.record_meter(tx.id, 1000.5, at(99))


def test_a_stale_reading_changes_nothing(store: Store) -> None:
    """Older and no more energy: a reading overtaken by a newer one (a MeterValues
    recorded the newer one first). Kept out, without an error."""
    tx = begin(store, wh=1000.0, t=100)
    store.record_meter(tx.id, 1100.0, at(160))
    before = store.transaction(tx.id)
    store.record_meter(tx.id, 1000.0, at(99))
    store.record_meter(tx.id, 1100.0, at(150))
    assert store.transaction(tx.id) == before


@pytest.mark.parametrize("energy", [float("nan"), float("inf"), -1.0])
def test_energies_must_be_finite_and_not_negative(store: Store, energy: float) -> None:
    with pytest.raises(StoreError, match="finite value >= 0"):
        begin(store, wh=energy)
    tx = begin(store)
    with pytest.raises(StoreError, match="finite value >= 0"):
        store.record_meter(tx.id, energy, at(1))
    with pytest.raises(StoreError, match="finite value >= 0"):
        store.end_transaction(tx.id, reason="Local", meter_stop_wh=energy, stopped_at=at(1))
    assert store.transaction(tx.id) == tx


def test_connector_zero_is_refused(store: Store) -> None:
    # OCPP 1.6: connector 0 is the charge point as a whole, never a transaction's.
    with pytest.raises(StoreError, match="connector id"):
        begin(store, connector_id=0)


def test_a_stopped_transaction_refuses_readings_and_a_second_end(store: Store) -> None:
    tx = begin(store)
    ended = store.end_transaction(
        tx.id, reason="EVDisconnected", meter_stop_wh=1500.0, stopped_at=at(60)
    )
    with pytest.raises(StoreError, match=r"stopped \(EVDisconnected\)"):
        store.record_meter(tx.id, 1600.0, at(70))
    with pytest.raises(StoreError, match=r"already ended \(EVDisconnected"):
        store.end_transaction(tx.id, reason="Local", meter_stop_wh=1600.0, stopped_at=at(70))
    assert store.transaction(tx.id) == ended  # never silently overwritten


def test_an_unknown_reason_is_refused(store: Store) -> None:
    tx = begin(store)
    with pytest.raises(StoreError, match=r"not an OCPP 1\.6 Reason"):
        store.end_transaction(tx.id, reason="local", meter_stop_wh=1000.0, stopped_at=at(1))
    assert store.transaction(tx.id).running


def test_unknown_transactions_are_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="no transaction 42"):
        store.transaction(42)
    with pytest.raises(StoreError, match="no transaction 42"):
        store.record_meter(42, 1.0, at(0))
    with pytest.raises(StoreError, match="no transaction 42"):
        store.end_transaction(42, reason="Local", meter_stop_wh=1.0, stopped_at=at(0))


def test_transactions_lists_newest_first_up_to_the_limit(store: Store) -> None:
    made = [begin(store, connector_id=c) for c in (1, 2, 3, 4)]
    assert store.transactions() == made[::-1]
    assert store.transactions(limit=2) == [made[3], made[2]]
    assert store.transactions(limit=0) == []
    with pytest.raises(StoreError, match="negative limit"):
        store.transactions(limit=-1)


def test_ids_are_monotonic_across_reopen_and_never_reused(db: Path) -> None:
    with Store.open(db) as s:
        ids = [begin(s, connector_id=c).id for c in (1, 2, 3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    # Prune the newest row behind the store's back: its id stays used.
    conn = raw(db)
    conn.execute("DELETE FROM transactions WHERE id = ?", (ids[-1],))
    conn.close()
    with Store.open(db) as s:
        assert begin(s, connector_id=3).id > ids[-1]


# -- power-loss recovery ----------------------------------------------------------


def test_recovery_ends_only_running_transactions_at_their_last_reading(db: Path) -> None:
    with Store.open(db) as s:
        with_readings = begin(s, connector_id=1, wh=1000.0, t=0)
        s.record_meter(with_readings.id, 1100.0, at(30))
        s.record_meter(with_readings.id, 1150.5, at(45))
        finished = begin(s, connector_id=2, wh=500.0, t=5)
        finished = s.end_transaction(
            finished.id, reason="Local", meter_stop_wh=600.0, stopped_at=at(40)
        )
        no_readings = begin(s, connector_id=3, wh=2000.0, t=10)
    # Power comes back: a new process opens the file.
    with Store.open(db) as s:
        recovered = s.recover_power_loss()
        assert [r.id for r in recovered] == [with_readings.id, no_readings.id]
        first, second = recovered
        assert (first.stop_reason, first.meter_stop_wh, first.stopped_at) == (
            "PowerLoss",
            1150.5,
            at(45),
        )
        assert first.stop_id_tag is None
        assert (second.stop_reason, second.meter_stop_wh, second.stopped_at) == (
            "PowerLoss",
            2000.0,
            at(10),
        )
        assert s.transaction(finished.id) == finished
        assert s.transactions() == [second, finished, first]
        assert s.recover_power_loss() == []
        assert begin(s, connector_id=1, t=100).running


# -- settings ---------------------------------------------------------------------


def test_settings_round_trip_upsert_and_delete(db: Path) -> None:
    with Store.open(db) as s:
        assert s.get_setting("HeartbeatInterval") is None
        s.set_setting("HeartbeatInterval", "300")
        s.set_setting("HeartbeatInterval", "60")
        s.set_settings({"A": "1", "B": "", "C": "ünïcode\nline"})
        assert s.get_setting("HeartbeatInterval") == "60"
        s.delete_setting("A")
        s.delete_setting("not there")
    with Store.open(db) as s:
        assert s.settings() == {"HeartbeatInterval": "60", "B": "", "C": "ünïcode\nline"}


def test_set_settings_is_all_or_nothing(store: Store) -> None:
    store.set_settings({"a": "old", "b": "old"})
    bad = {"a": "new", "c": "new", "b": 2, "d": "new"}
    with pytest.raises(StoreError, match=r"store settings.*'b' = 2: keys and values must be text"):
        store.set_settings(bad)  # type: ignore[arg-type]
    assert store.settings() == {"a": "old", "b": "old"}


@pytest.mark.parametrize(("key", "value"), [("k", 1), ("k", None), ("", "v"), (3, "v")])
def test_set_setting_refuses_what_is_not_a_text_pair(
    store: Store, key: object, value: object
) -> None:
    with pytest.raises(StoreError):
        store.set_setting(key, value)  # type: ignore[arg-type]
    assert store.settings() == {}


# -- use from trio ------------------------------------------------------------------


async def test_concurrent_calls_from_worker_threads_are_serialized(store: Store) -> None:
    # Many trio tasks, each in its own worker thread, writing at once: the lock
    # keeps their SQLite transactions from interleaving on the one connection.
    readings = 25

    async def charge(connector_id: int) -> None:
        tx = await trio.to_thread.run_sync(begin, store, connector_id)
        for k in range(1, readings + 1):
            await trio.to_thread.run_sync(store.record_meter, tx.id, 1000.0 + k, at(k))
            await trio.to_thread.run_sync(store.set_setting, f"c{connector_id}", str(k))

    async with trio.open_nursery() as nursery:
        for connector_id in range(1, 9):
            nursery.start_soon(charge, connector_id)
    for connector_id in range(1, 9):
        tx = store.running_transaction(connector_id)
        assert tx is not None
        assert (tx.last_meter_wh, tx.last_meter_at) == (1000.0 + readings, at(readings))
        assert store.get_setting(f"c{connector_id}") == str(readings)


# -- record ordering, as a property ---------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 5), st.integers(-3, 5)), max_size=12))
def test_a_reading_is_kept_iff_neither_time_nor_energy_goes_back(  # or stale: ignored
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[int, int]]
) -> None:
    # A fresh file per example: a failing example leaves nothing behind.
    with Store.open(tmp_path_factory.mktemp("ordering") / "station.db") as s:
        tx = begin(s, wh=100.0, t=0)
        last_t, last_wh = 0, 100
        t, wh = 0, 100
        for dt, dwh in steps:
            t, wh = t + dt, wh + dwh
            if t >= last_t and wh >= last_wh:
                s.record_meter(tx.id, float(wh), at(t))
                last_t, last_wh = t, wh
            elif t < last_t and wh <= last_wh:
                s.record_meter(tx.id, float(wh), at(t))  # stale: changes nothing
            else:
                with pytest.raises(StoreError):
                    s.record_meter(tx.id, float(wh), at(t))
            stored = s.transaction(tx.id)
            assert (stored.last_meter_wh, stored.last_meter_at) == (last_wh, at(last_t))
        ended = s.recover_power_loss()
        assert [(r.meter_stop_wh, r.stopped_at) for r in ended] == [(last_wh, at(last_t))]


# -- a real kill -9 ---------------------------------------------------------------------


def _killed_child_run(db: Path, rng: random.Random) -> list[str]:
    """Run the child, SIGKILL it at a random moment; the ``recorded`` lines it printed."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(child.__file__)), str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(10.0, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        assert first.startswith("started "), f"child failed: {first!r} {proc.stderr.read()}"
        lines = [proc.stdout.readline() for _ in range(rng.randint(1, 40))]
        # Somewhere inside a later record_meter, or between two of them.
        time.sleep(rng.uniform(0, 0.003))
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    finally:
        watchdog.cancel()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    # A line cut short by the kill was not printed whole: it does not count.
    return [line.rstrip("\n") for line in lines] + rest.split("\n")[:-1]


@pytest.mark.slow
def test_kill_9_loses_no_reading_that_was_reported_recorded(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for run in range(10):
        db = tmp_path / f"crash{run}.db"
        lines = _killed_child_run(db, rng)
        printed = len(lines)
        for k, line in enumerate(lines, start=1):
            energy, when = child.reading(k)
            assert line == f"recorded {energy!r} {to_text(when)}", (seed, run, k)
        with Store.open(db) as s:
            (ended,) = s.recover_power_loss()
        assert ended.stop_reason == "PowerLoss"
        assert ended.meter_stop_wh is not None
        k = round((ended.meter_stop_wh - child.START_WH) / child.STEP_WH)
        # Everything printed is on disk; at most one more reading was committed
        # after the last print and before the kill.
        assert k in (printed, printed + 1), (seed, run, printed, k)
        assert (ended.meter_stop_wh, ended.stopped_at) == child.reading(k), (seed, run)
        assert (ended.last_meter_wh, ended.last_meter_at) == child.reading(k)
