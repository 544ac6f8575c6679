"""Charging profiles kept across a restart, in the station's SQLite file.

Theory of operation
-------------------
OCPP 1.6 §3.13 expects a charge point to keep its ChargePointMaxProfile and
TxDefaultProfile profiles (the central system does not send them again after
a reboot). A TxProfile belongs to one transaction, and no transaction
survives a restart (evse/store.py ends them as PowerLoss), so TxProfiles are
never written: ``save`` leaves them out and the table's CHECK refuses them.

The profiles live in the station's one SQLite file (the file evse/store.py
and the OCPP queue use), in a table of their own, ``ocpp_charging_profiles``:
one row per profile, its connector, purpose and the ``csChargingProfiles``
object as canonical JSON (``ChargingProfile.to_payload``, sorted keys). The
access discipline is ``ocpp16.sqlite.SqliteAccess``'s: one connection
(``check_same_thread=False``, autocommit) behind a lock, WAL with
``synchronous=FULL`` set and read back on open, every write one ``BEGIN
IMMEDIATE`` transaction committed before the method returns, ``busy_timeout``
so the other connections to the file are waited for, not failed on. The
methods are synchronous; trio code calls them through
``trio.to_thread.run_sync``.

No flash wear: ``save`` compares the set with what the file holds (an
in-memory copy, read at ``load`` and kept after each write) and, when nothing
changed, returns without opening a transaction. When something did, only the
rows that differ are deleted or written. ``writes`` counts the transactions
committed, for tests and the status view.

``load`` parses every row with ``parse_profile`` and the station's current
limits; a row that no longer passes (limits lowered by a firmware update, an
older firmware's row) is left out and listed in ``dropped`` for the log, and
the next ``save`` removes it from the file.

The schema version of this table is the ``charging_profiles_schema_version``
row of ``ocpp_meta`` (the OCPP tables' version table; the queue's own row is
``schema_version``), migrated like the queue's: one committed transaction per
migration, the version read inside it. Every ``sqlite3.Error`` becomes
``ProfileStoreError`` naming the file and what was being done.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from ocpp16.errors import OcppError
from ocpp16.smart_charging import (
    DEFAULT_CONFIG,
    InstalledProfile,
    ProfileRejected,
    ProfileSet,
    SmartChargingConfig,
    parse_profile,
)
from ocpp16.sqlite import SqliteAccess

# Migrations of ocpp_charging_profiles: MIGRATIONS[n] takes the version n to
# n + 1 in one transaction. Append only; never edit a released migration.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE ocpp_charging_profiles (
            charging_profile_id INTEGER PRIMARY KEY
                CHECK (typeof(charging_profile_id) = 'integer'),
            connector_id        INTEGER NOT NULL
                CHECK (typeof(connector_id) = 'integer' AND connector_id >= 0),
            purpose             TEXT NOT NULL
                CHECK (purpose IN ('ChargePointMaxProfile', 'TxDefaultProfile')),
            profile             TEXT NOT NULL
                CHECK (json_valid(profile) AND json_type(profile) = 'object')
        )
        """,
    ),
)

#: The version of ocpp_charging_profiles this code writes and understands.
SCHEMA_VERSION: Final = len(MIGRATIONS)
_VERSION_KEY: Final = "charging_profiles_schema_version"
_SYNCHRONOUS_FULL: Final = 2
#: How long a write waits for another connection to the file to commit.
BUSY_TIMEOUT_S: Final = 10.0

#: A row as stored: (connector_id, purpose, canonical JSON).
_Row = tuple[int, str, str]


class ProfileStoreError(OcppError):
    """The profile table at ``path`` failed; ``reason`` says how."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _row(entry: InstalledProfile) -> _Row:
    payload = entry.profile.to_payload()
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return (entry.connector_id, str(entry.profile.purpose.value), text)


class ProfileStore(SqliteAccess):
    """The persistent profiles. Open with ``ProfileStore.open(path)``."""

    _closed_message = "the profile store is closed"

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        # Use ProfileStore.open: it sets and verifies the pragmas and migrates.
        self._path = path
        self._conn: sqlite3.Connection | None = connection
        self._lock = threading.Lock()
        # Held across a whole load or save, so the in-memory copy of the file
        # and the file change together even when two threads save at once.
        self._save_lock = threading.Lock()
        self._stored: dict[int, _Row] | None = None  # what the file holds, once known
        self._writes = 0
        self._dropped: tuple[tuple[int, str], ...] = ()

    @classmethod
    def open(cls, path: str | Path) -> ProfileStore:
        """Open (or create) the profile table in the file at ``path``."""
        path = Path(path)
        if not path.parent.is_dir():
            raise ProfileStoreError(str(path.parent), "directory does not exist")
        if path.is_dir():
            raise ProfileStoreError(str(path), "is a directory, not a database file")
        try:
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise ProfileStoreError(str(path), f"cannot open: {exc}") from exc
        store = cls(path, conn)
        try:
            store._configure()
            store._migrate()
        except BaseException:
            conn.close()
            raise
        return store

    def close(self) -> None:
        """Close the connection; later calls raise ProfileStoreError. Twice is harmless."""
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
    def writes(self) -> int:
        """Write transactions committed by ``save`` since open."""
        return self._writes

    @property
    def dropped(self) -> tuple[tuple[int, str], ...]:
        """(chargingProfileId, reason) of the rows the last ``load`` left out."""
        return self._dropped

    # -- the two operations -------------------------------------------------------

    def load(self, config: SmartChargingConfig = DEFAULT_CONFIG) -> ProfileSet:
        """The persisted ChargePointMax and TxDefault profiles, as a set (start-up)."""
        with self._save_lock:
            return self._load(config)

    def _load(self, config: SmartChargingConfig) -> ProfileSet:
        with self._read("load the charging profiles") as conn:
            rows = self._rows(conn)
        entries: list[InstalledProfile] = []
        dropped: list[tuple[int, str]] = []
        for profile_id, (connector_id, purpose, text) in sorted(rows.items()):
            try:
                payload: Any = json.loads(text)
                profile = parse_profile(connector_id, payload, config)
            except (ValueError, ProfileRejected) as exc:
                dropped.append((profile_id, str(exc)))
                continue
            if profile.id != profile_id:
                dropped.append((profile_id, f"the row holds chargingProfileId {profile.id}"))
                continue
            entry = InstalledProfile(connector_id, profile)
            if _row(entry) != rows[profile_id]:
                # Valid, but not the canonical text this firmware writes: the
                # copy differs, so the next save rewrites the row.
                rows[profile_id] = (connector_id, purpose, "")
            entries.append(entry)
        self._stored = rows
        self._dropped = tuple(dropped)
        return ProfileSet(config, tuple(entries))

    def save(self, profiles: ProfileSet) -> bool:
        """Persist the set's ChargePointMax and TxDefault profiles; TxProfiles never.

        Returns whether anything was written: an unchanged set writes nothing.
        """
        with self._save_lock:
            return self._save(profiles)

    def _save(self, profiles: ProfileSet) -> bool:
        wanted = {e.profile.id: _row(e) for e in profiles.persistent()}
        if wanted == self._stored:
            return False
        with self._write("save the charging profiles") as conn:
            stored = self._rows(conn)
            for profile_id in stored.keys() - wanted.keys():
                conn.execute(
                    "DELETE FROM ocpp_charging_profiles WHERE charging_profile_id = ?",
                    (profile_id,),
                )
            for profile_id, row in wanted.items():
                if stored.get(profile_id) != row:
                    conn.execute(
                        "INSERT INTO ocpp_charging_profiles"
                        " (charging_profile_id, connector_id, purpose, profile)"
                        " VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (charging_profile_id) DO UPDATE SET"
                        " connector_id = excluded.connector_id, purpose = excluded.purpose,"
                        " profile = excluded.profile",
                        (profile_id, *row),
                    )
        self._writes += 1
        self._stored = wanted
        return True

    # -- internals ------------------------------------------------------------------

    def _fail(self, message: str) -> Exception:
        return ProfileStoreError(str(self._path), message)

    @staticmethod
    def _rows(conn: sqlite3.Connection) -> dict[int, _Row]:
        return {
            int(pid): (int(cid), str(purpose), str(text))
            for pid, cid, purpose, text in conn.execute(
                "SELECT charging_profile_id, connector_id, purpose, profile"
                " FROM ocpp_charging_profiles"
            )
        }

    def _configure(self) -> None:
        """Set and verify the pragmas the durability rule depends on."""
        with self._read("configure") as conn:
            # Reading the header first turns a file that is not a database
            # into an error that says so, before any pragma is attempted.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            if mode != "wal":
                raise self._fail(f"cannot enable WAL journal mode (the file stays in {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            sync = int(conn.execute("PRAGMA synchronous").fetchone()[0])
            if sync != _SYNCHRONOUS_FULL:
                raise self._fail(f"synchronous is {sync}, not FULL (2)")
            wanted = round(BUSY_TIMEOUT_S * 1000)
            busy = int(conn.execute(f"PRAGMA busy_timeout = {wanted:d}").fetchone()[0])
            if busy != wanted:
                raise self._fail(f"busy_timeout is {busy} ms, not {wanted}")

    def _migrate(self) -> None:
        """Bring ocpp_charging_profiles to SCHEMA_VERSION, one committed step at a time."""
        while True:
            with self._write("migrate the charging profiles' schema") as conn:
                # The same definition as the queue's (ocpp16/queue.py), whichever
                # of the two opens a new file first.
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS ocpp_meta ("
                    " key TEXT PRIMARY KEY NOT NULL CHECK (typeof(key) = 'text'),"
                    " value INTEGER NOT NULL)"
                )
                row = conn.execute(
                    "SELECT value FROM ocpp_meta WHERE key = ?", (_VERSION_KEY,)
                ).fetchone()
                version = 0 if row is None else int(row[0])
                if version > SCHEMA_VERSION:
                    raise self._fail(
                        f"charging profile schema version {version} is newer than this"
                        f" firmware's {SCHEMA_VERSION}"
                    )
                if version == SCHEMA_VERSION:
                    return
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO ocpp_meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_VERSION_KEY, version + 1),
                )
