"""The SQLite access discipline shared by the station's store and the OCPP queue.

Both keep one connection (``check_same_thread=False``, autocommit) to the
station's file behind a ``threading.Lock``, run every write as one
``BEGIN IMMEDIATE`` transaction committed before the block returns, and
translate ``sqlite3.Error`` into their own package's error. It lives in
ocpp16/ because evse/ may import ocpp16/, not the other way round.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SqliteAccess:
    """Mixin: ``_read`` / ``_write`` blocks on ``self._conn`` under ``self._lock``."""

    _path: Path
    _conn: sqlite3.Connection | None
    _lock: threading.Lock
    #: Said when the object is used after close().
    _closed_message = "the file is closed"

    def _fail(self, message: str) -> Exception:
        """The package's own error for ``message``, naming the file."""
        raise NotImplementedError

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise self._fail(f"{what}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise self._fail(self._closed_message)
        return self._conn

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._translate(what):
            yield self._connection()

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One committed transaction opened with BEGIN IMMEDIATE.

        The commit has happened when the block exits normally; on any error (a
        refusal raised inside the block included, and cancellation, which is
        re-raised) it is rolled back.
        """
        with self._lock, self._translate(what):
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
