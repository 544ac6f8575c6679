"""The station's one SQLite file: settings and charging transactions.

Theory of operation
-------------------
The firmware's rule: a transaction record is on disk before the firmware
acts on it, e.g. before the contactor closes, so a power failure never leaves
a charge the central system will not hear about (OCPP 1.6 asks a charge point
to keep transaction messages until the central system has them). So every
write here runs in one SQLite transaction that is committed, with
``synchronous=FULL`` in WAL mode (the WAL is fsynced at each commit), before
the method returns. Both pragmas are set and read back on open; a file
that cannot run in WAL mode is refused.

The methods are synchronous; trio code calls them through
``trio.to_thread.run_sync``. There is one connection (``check_same_thread=
False``) and a ``threading.Lock`` around every use of it, so calls from
several worker threads are serialized and never interleave their
transactions.

The connection runs in SQLite's own autocommit mode (``isolation_level=None``)
and each write opens ``BEGIN IMMEDIATE`` itself: the reads that decide a write
(is a transaction already running on this connector?) are then inside the same
transaction as the write, which Python's implicit BEGIN (issued only before
the first INSERT/UPDATE) would not give. Schema migrations run the same way,
DDL and ``PRAGMA user_version`` together, so a migration is all or nothing.

Every ``sqlite3.Error`` is translated here into ``StoreError`` naming the file
and what was being done; refusals (second running transaction on a connector,
a reading going backwards, ending a transaction twice) are ``StoreError`` too.

Times are timezone-aware datetimes, stored in UTC as fixed-width ISO-8601 text
with microseconds and a ``Z`` (so text order is time order); naive datetimes
are refused. Energies are REAL watt-hours.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

from evse.errors import StoreError
from ocpp16.sqlite import SqliteAccess
from ocpp16.vocabulary import StopReason

#: OCPP 1.6 Reason (StopTransaction.req ``reason``): why a transaction stopped.
STOP_REASONS: Final[frozenset[str]] = frozenset(StopReason)

# Schema migrations: MIGRATIONS[n] takes user_version n to n + 1, in one
# transaction. Append only; never edit a migration that has been released,
# since stations in the field have already run it.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: settings and transactions.
    (
        """
        CREATE TABLE settings (
            key   TEXT PRIMARY KEY NOT NULL CHECK (typeof(key) = 'text' AND key <> ''),
            value TEXT NOT NULL CHECK (typeof(value) = 'text')
        )
        """,
        # AUTOINCREMENT: a local id is never reused, even after old rows are
        # pruned; the queue and the central system may still refer to it.
        """
        CREATE TABLE transactions (
            id             INTEGER PRIMARY KEY AUTOINCREMENT,
            connector_id   INTEGER NOT NULL CHECK (connector_id >= 1),
            id_tag         TEXT NOT NULL CHECK (typeof(id_tag) = 'text'),
            meter_start_wh REAL NOT NULL CHECK (meter_start_wh >= 0),
            started_at     TEXT NOT NULL CHECK (started_at LIKE '____-__-__T__:__:__.______Z'),
            last_meter_wh  REAL NOT NULL CHECK (last_meter_wh >= meter_start_wh),
            last_meter_at  TEXT NOT NULL CHECK (last_meter_at >= started_at),
            stop_reason    TEXT,
            meter_stop_wh  REAL CHECK (meter_stop_wh >= meter_start_wh),
            stopped_at     TEXT CHECK (stopped_at >= started_at),
            stop_id_tag    TEXT CHECK (stop_id_tag IS NULL OR typeof(stop_id_tag) = 'text'),
            CHECK ((stop_reason IS NULL) = (meter_stop_wh IS NULL)),
            CHECK ((stop_reason IS NULL) = (stopped_at IS NULL))
        )
        """,
        # The one-running-transaction-per-connector rule, held by the file
        # itself as well as by begin_transaction.
        """
        CREATE UNIQUE INDEX transactions_one_running_per_connector
            ON transactions (connector_id) WHERE stop_reason IS NULL
        """,
    ),
    # 2: the reservation a transaction used (OCPP 1.6 StartTransaction.req
    # reservationId), so that its StartTransaction, built from the record, says so.
    (
        """
        ALTER TABLE transactions ADD COLUMN reservation_id INTEGER
            CHECK (reservation_id IS NULL OR typeof(reservation_id) = 'integer')
        """,
    ),
)

#: The schema version this code writes and understands.
SCHEMA_VERSION: Final = len(MIGRATIONS)

_SYNCHRONOUS_FULL: Final = 2
_COLUMNS: Final = (
    "id, connector_id, id_tag, meter_start_wh, started_at, last_meter_wh, last_meter_at,"
    " stop_reason, meter_stop_wh, stopped_at, stop_id_tag, reservation_id"
)
_Row = tuple[
    int,
    int,
    str,
    float,
    str,
    float,
    str,
    str | None,
    float | None,
    str | None,
    str | None,
    int | None,
]


class Journal(Protocol):
    """The central-system side of a transaction record, written in the same SQLite
    transaction as the record itself (rule 2: no crash can fall between a
    transaction's start or end and its queued OCPP message).

    Each method runs inside the store's open write transaction, on its
    connection, in the store's worker thread: it may only read and write its
    own tables through ``conn`` (the OCPP queue's ``enqueue_on``), never commit.
    """

    def started(self, conn: sqlite3.Connection, record: TransactionRecord) -> None:
        """The transaction was just inserted: queue its StartTransaction."""

    def ended(self, conn: sqlite3.Connection, record: TransactionRecord) -> None:
        """The transaction's end was just written: queue its StopTransaction."""

    def unreported(self, conn: sqlite3.Connection, record: TransactionRecord) -> bool:
        """An ended transaction whose start was reported but whose stop never was
        (a store written by firmware before the journal): queue the stop."""


@dataclass(frozen=True)
class TransactionRecord:
    """One charging transaction as persisted."""

    id: int  # local id, autoincrement, never reused
    connector_id: int
    id_tag: str
    meter_start_wh: float
    started_at: datetime
    last_meter_wh: float  # last persisted reading (== meter_start_wh until one is recorded)
    last_meter_at: datetime
    stop_reason: str | None  # OCPP 1.6 Reason; None while running
    meter_stop_wh: float | None
    stopped_at: datetime | None
    stop_id_tag: str | None
    #: The reservation the transaction used (OCPP 1.6 ReserveNow), if any.
    reservation_id: int | None = None

    @property
    def running(self) -> bool:
        return self.stop_reason is None


def to_text(at: datetime) -> str:
    """A timezone-aware datetime as fixed-width UTC ISO-8601 text ending in 'Z'."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at.isoformat()} (a timezone is required)")
    utc = at.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def from_text(text: str) -> datetime:
    """The inverse of ``to_text``: an aware datetime in UTC."""
    at = datetime.fromisoformat(text)
    if at.utcoffset() != timedelta(0):
        raise ValueError(f"stored time {text!r} is not UTC")
    return at.astimezone(UTC)


#: How many of the latest ended transactions recovery checks for a stop that was
#: never queued (older firmware wrote the end and queued the stop separately).
UNREPORTED_SCAN: Final = 500


def _raised(record: TransactionRecord, energy: float, at: datetime) -> tuple[float, datetime]:
    """A stop never below or before the last persisted reading, which includes
    every reading a queued MeterValues reported (``record_meter(then=...)``)."""
    return max(energy, record.last_meter_wh), max(at, record.last_meter_at)


def _record(row: _Row) -> TransactionRecord:
    return TransactionRecord(
        id=row[0],
        connector_id=row[1],
        id_tag=row[2],
        meter_start_wh=float(row[3]),
        started_at=from_text(row[4]),
        last_meter_wh=float(row[5]),
        last_meter_at=from_text(row[6]),
        stop_reason=row[7],
        meter_stop_wh=None if row[8] is None else float(row[8]),
        stopped_at=None if row[9] is None else from_text(row[9]),
        stop_id_tag=row[10],
        reservation_id=row[11],
    )


class Store(SqliteAccess):
    """The station's SQLite file. Open with ``Store.open(path)``."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        # Use Store.open: it sets and verifies the pragmas and migrates.
        self._path = path
        self._conn: sqlite3.Connection | None = connection
        self._lock = threading.Lock()

    # -- opening and closing ------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open (or create) the store at ``path``; the directory must exist."""
        path = Path(path)
        if not path.parent.is_dir():
            raise StoreError(f"directory {path.parent} does not exist", path=path.parent)
        if path.is_dir():
            raise StoreError("is a directory, not a database file", path=path)
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open: {exc}", path=path) from exc
        store = cls(path, conn)
        try:
            store._configure()
            store._migrate()
        except BaseException:
            conn.close()
            raise
        return store

    def close(self) -> None:
        """Close the file; later calls raise StoreError. Closing twice is harmless."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with self._translate("close"):
                    conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def schema_version(self) -> int:
        with self._read("read the schema version") as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def pragmas(self) -> dict[str, str | int]:
        """The settings durability depends on, as this connection sees them."""
        with self._read("read the pragmas") as conn:
            return {
                name: conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys", "user_version")
            }

    # -- transactions ---------------------------------------------------------

    def begin_transaction(
        self,
        *,
        connector_id: int,
        id_tag: str,
        meter_start_wh: float,
        started_at: datetime,
        journal: Journal | None = None,
        reservation_id: int | None = None,
    ) -> TransactionRecord:
        """Persist a new running transaction; refuses a second one on the connector.

        With ``journal``, its StartTransaction is queued in the same commit;
        ``reservation_id``: the reservation it uses.
        """
        what = f"begin a transaction on connector {connector_id}"
        if connector_id < 1:
            raise StoreError(f"{what}: connector id must be 1 or more", path=self._path)
        energy = self._energy(what, meter_start_wh)
        at = self._time(what, started_at)
        with self._write(what) as conn:
            running = self._running(conn, connector_id)
            if running is not None:
                raise StoreError(
                    f"{what}: transaction {running.id} is still running there", path=self._path
                )
            cursor = conn.execute(
                "INSERT INTO transactions (connector_id, id_tag, meter_start_wh, started_at,"
                " last_meter_wh, last_meter_at, reservation_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (connector_id, id_tag, energy, at, energy, at, reservation_id),
            )
            assert cursor.lastrowid is not None
            record = self._get(conn, cursor.lastrowid)
            if journal is not None:
                journal.started(conn, record)
            return record

    def record_meter(
        self,
        tx_id: int,
        energy_wh: float,
        at: datetime,
        *,
        then: Callable[[sqlite3.Connection], object] | None = None,
    ) -> None:
        """Persist a reading of a running transaction as its last one.

        A reading older than the last one and with no more energy (a stale
        reading overtaken by a newer one) changes nothing. Refused: energy
        below the last reading at the same or a later time (the import
        register only counts up), more energy at an earlier time, and a
        stopped transaction. ``then`` runs in the same commit (the
        transaction's MeterValues, queued with the reading it reports, so a
        stop never reports less).
        """
        what = f"record a meter reading for transaction {tx_id}"
        energy = self._energy(what, energy_wh)
        text = self._time(what, at)
        with self._write(what) as conn:
            record = self._get(conn, tx_id)
            if not record.running:
                raise StoreError(f"{what}: it stopped ({record.stop_reason})", path=self._path)
            stale = at < record.last_meter_at and energy <= record.last_meter_wh
            if not stale:
                self._check_not_backwards(what, record, energy, at)
                conn.execute(
                    "UPDATE transactions SET last_meter_wh = ?, last_meter_at = ? WHERE id = ?",
                    (energy, text, tx_id),
                )
            if then is not None:
                then(conn)

    def end_transaction(
        self,
        tx_id: int,
        *,
        reason: str,
        meter_stop_wh: float,
        stopped_at: datetime,
        id_tag: str | None = None,
        journal: Journal | None = None,
    ) -> TransactionRecord:
        """Persist the end of a running transaction; ending it twice is refused.

        The stop is never below, nor before, the last persisted reading (which
        includes every reading a queued MeterValues reported): both are raised
        to it. With ``journal``, the StopTransaction is queued in the
        same commit.
        """
        what = f"end transaction {tx_id}"
        if reason not in STOP_REASONS:
            raise StoreError(f"{what}: {reason!r} is not an OCPP 1.6 Reason", path=self._path)
        energy = self._energy(what, meter_stop_wh)
        text = self._time(what, stopped_at)
        with self._write(what) as conn:
            record = self._get(conn, tx_id)
            if not record.running:
                raise StoreError(
                    f"{what}: it already ended ({record.stop_reason} at {record.stopped_at})",
                    path=self._path,
                )
            energy, stopped_at = _raised(record, energy, stopped_at)
            text = self._time(what, stopped_at)
            # The stop reading is also the last persisted reading.
            conn.execute(
                "UPDATE transactions SET stop_reason = ?, meter_stop_wh = ?, stopped_at = ?,"
                " stop_id_tag = ?, last_meter_wh = ?, last_meter_at = ? WHERE id = ?",
                (reason, energy, text, id_tag, energy, text, tx_id),
            )
            ended = self._get(conn, tx_id)
            if journal is not None:
                journal.ended(conn, ended)
            return ended

    def running_transaction(self, connector_id: int) -> TransactionRecord | None:
        with self._read(f"find the running transaction on connector {connector_id}") as conn:
            return self._running(conn, connector_id)

    def transaction(self, tx_id: int) -> TransactionRecord:
        """The transaction with this local id; StoreError if there is none."""
        with self._read(f"read transaction {tx_id}") as conn:
            return self._get(conn, tx_id)

    def transactions(self, *, limit: int = 100) -> list[TransactionRecord]:
        """The latest ``limit`` transactions, newest first."""
        if limit < 0:
            raise StoreError(f"list transactions: negative limit {limit}", path=self._path)
        with self._read("list transactions") as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM transactions ORDER BY id DESC LIMIT ?",  # noqa: S608
                (limit,),
            ).fetchall()
        return [_record(row) for row in rows]

    def recover_power_loss(
        self,
        *,
        reading: tuple[float, datetime] | None = None,
        journal: Journal | None = None,
    ) -> list[TransactionRecord]:
        """End every running transaction as lost to a power failure.

        Run once at start-up, after the board was switched off and before
        anything else touches transactions. ``reading`` is the meter's (energy,
        time) read at this restart, when the meter answered: the energy that
        flowed until the off-write belongs to the transaction, so it ends with
        that reading; else with its last persisted one (which includes what its
        MeterValues reported), never below or before it. OCPP 1.6
        Reason ``PowerLoss``, "complete loss of power"; each StopTransaction is
        queued in the same commit (``journal``), and so is the stop of an
        ended transaction whose stop was never queued (an older firmware's
        crash between the two). Returns the ended records, oldest first.
        """
        what = "recover transactions after a power loss"
        if reading is not None:
            self._energy(what, reading[0])
            self._time(what, reading[1])
        with self._write(what) as conn:
            running = [
                _record(row)
                for row in conn.execute(
                    f"SELECT {_COLUMNS} FROM transactions"  # noqa: S608
                    " WHERE stop_reason IS NULL ORDER BY id"
                )
            ]
            ended: list[TransactionRecord] = []
            for record in running:
                energy, at = record.last_meter_wh, record.last_meter_at
                if reading is not None:
                    energy, at = max(energy, reading[0]), max(at, reading[1])
                energy, at = _raised(record, energy, at)
                text = self._time(what, at)
                conn.execute(
                    "UPDATE transactions SET stop_reason = ?, meter_stop_wh = ?,"
                    " stopped_at = ?, stop_id_tag = NULL, last_meter_wh = ?, last_meter_at = ?"
                    " WHERE id = ?",
                    (StopReason.POWER_LOSS.value, energy, text, energy, text, record.id),
                )
                done = self._get(conn, record.id)
                if journal is not None:
                    journal.ended(conn, done)
                ended.append(done)
            if journal is not None:
                recent = conn.execute(
                    f"SELECT {_COLUMNS} FROM transactions"  # noqa: S608
                    " WHERE stop_reason IS NOT NULL ORDER BY id DESC LIMIT ?",
                    (UNREPORTED_SCAN,),
                ).fetchall()
                for row in reversed(recent):
                    old = _record(row)
                    if old.id not in {r.id for r in ended} and journal.unreported(conn, old):
                        journal.ended(conn, old)
            return ended

    # -- settings -------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        with self._read(f"read setting {key!r}") as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def settings(self) -> dict[str, str]:
        """Every stored setting."""
        with self._read("read settings") as conn:
            return {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM settings")}

    def set_setting(self, key: str, value: str) -> None:
        self.set_settings({key: value})

    def set_settings(self, values: Mapping[str, str]) -> None:
        """Store several settings in one transaction: all of them or none."""
        what = f"store settings {sorted(map(str, values))}"
        with self._write(what) as conn:
            # Checked one by one inside the transaction: a bad pair found after
            # others were written rolls them back with it. (TEXT affinity would
            # quietly turn a number into text, so the table's CHECKs cannot.)
            for key, value in values.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise StoreError(
                        f"{what}: {key!r} = {value!r}: keys and values must be text",
                        path=self._path,
                    )
                conn.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    def delete_setting(self, key: str) -> None:
        """Remove a setting; removing one that is not there is harmless."""
        with self._write(f"delete setting {key!r}") as conn:
            conn.execute("DELETE FROM settings WHERE key = ?", (key,))

    # -- internals ------------------------------------------------------------

    def _configure(self) -> None:
        """Set and verify the pragmas the durability rule depends on."""
        with self._read("configure") as conn:
            # Reading the header first turns a file that is not a database
            # into an error that says so, before any pragma is attempted.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            if mode != "wal":
                raise StoreError(
                    f"cannot enable WAL journal mode (the file stays in {mode!r} mode)",
                    path=self._path,
                )
            conn.execute("PRAGMA synchronous = FULL")
            sync = int(conn.execute("PRAGMA synchronous").fetchone()[0])
            if sync != _SYNCHRONOUS_FULL:
                raise StoreError(f"synchronous is {sync}, not FULL (2)", path=self._path)
            conn.execute("PRAGMA foreign_keys = ON")
            if int(conn.execute("PRAGMA foreign_keys").fetchone()[0]) != 1:
                raise StoreError("cannot enable foreign keys", path=self._path)
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreError(f"damaged: {'; '.join(problems[:5])}", path=self._path)

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION, one committed migration at a time.

        The version is read inside each migration's transaction, so two
        processes opening a new file at once cannot both apply a migration.
        """
        while True:
            with self._write("migrate the schema") as conn:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"schema version {version} is newer than this firmware's {SCHEMA_VERSION}",
                        path=self._path,
                    )
                if version == SCHEMA_VERSION:
                    return
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1:d}")

    _closed_message = "the store is closed"

    def _fail(self, message: str) -> Exception:
        return StoreError(message, path=self._path)

    def _energy(self, what: str, value: float) -> float:
        energy = float(value)
        if not math.isfinite(energy) or energy < 0:
            raise StoreError(
                f"{what}: energy {value!r} Wh is not a finite value >= 0", path=self._path
            )
        return energy

    def _time(self, what: str, at: datetime) -> str:
        try:
            return to_text(at)
        except (ValueError, OverflowError) as exc:
            raise StoreError(f"{what}: {exc}", path=self._path) from exc

    def _check_not_backwards(
        self, what: str, record: TransactionRecord, energy: float, at: datetime
    ) -> None:
        if at < record.last_meter_at:
            raise StoreError(
                f"{what}: time {to_text(at)} is before the last reading at"
                f" {to_text(record.last_meter_at)}",
                path=self._path,
            )
        if energy < record.last_meter_wh:
            raise StoreError(
                f"{what}: energy {energy} Wh is below the last reading {record.last_meter_wh} Wh",
                path=self._path,
            )

    def _get(self, conn: sqlite3.Connection, tx_id: int) -> TransactionRecord:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM transactions WHERE id = ?",  # noqa: S608
            (tx_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"no transaction {tx_id}", path=self._path)
        return _record(row)

    def _running(self, conn: sqlite3.Connection, connector_id: int) -> TransactionRecord | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM transactions"  # noqa: S608
            " WHERE connector_id = ? AND stop_reason IS NULL",
            (connector_id,),
        ).fetchone()
        return None if row is None else _record(row)
