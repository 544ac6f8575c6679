"""The persistent queue of transaction messages (OCPP 1.6 "Transaction-related messages").

Theory of operation
-------------------
OCPP 1.6 asks a charge point to deliver StartTransaction, StopTransaction and
transaction MeterValues reliably and in order, across lost connections and
restarts. This module keeps those messages in the station's one SQLite file
(the file ``evse/store.py`` uses), in tables of its own prefixed ``ocpp_``,
through a connection of its own. (SecurityEventNotification has a queue of
its own in the same file, ``SecurityEventQueue`` at the end of this module,
which says why.) The guarantees:

* **On disk before ``enqueue`` returns.** Every write is one SQLite
  transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) in WAL mode with
  ``synchronous=FULL``, so the WAL is fsynced at the commit. Both pragmas are
  set and read back on open; a file that will not run in WAL mode is refused.
* **Strict FIFO.** ``seq`` is an AUTOINCREMENT key (never reused, even after
  a delivery or a restart); ``head()`` is always the lowest pending ``seq``.
* **Removed only once its CALLRESULT has been processed.** The sender takes
  ``head()``, sends it, and calls ``delivered()`` with the CALLRESULT's
  payload. A crash (kill -9, power loss) between the send and ``delivered()``
  leaves the message at the head, so it is sent again after the restart,
  **with the same OCPP-J message id**: ``unique_id`` (a uuid4) is chosen and
  committed by ``enqueue``, never at send time. That is at-least-once on the
  wire and exactly-once for a central system that deduplicates by message id,
  which OCPP-J 1.6 §4.1.3 allows (the id must be unique for each *message*; a
  resend of the same message keeps it). Only the message in flight at the
  crash can be sent twice.
* **Idempotent enqueue.** ``dedupe_key`` (e.g. ``"start:12"``, ``"stop:12"``)
  names a message once for ever: enqueuing the same key again returns the
  message first enqueued under it, whatever became of it (pending, delivered
  or dead), and adds nothing. The keys of delivered messages are kept
  (``ocpp_delivered``) for that reason, so a transaction end reported twice
  across a crash is sent once. Keyless messages (MeterValues) are deleted on
  delivery and leave no trace.
* **Nothing is silently deleted.** ``failed()`` counts a CALLERROR or a
  response timeout *while connected* (the sender never calls it while
  offline: waiting for the link is not a failure). When ``attempts`` reaches
  ``max_attempts`` (TransactionMessageAttempts) the message moves to the
  dead letters (``ocpp_dead_letters``) in the same SQLite transaction. A dead
  StartTransaction takes every later message of its transaction with it,
  with the reason ``"its StartTransaction was not delivered"``: without a
  transactionId from the central system they cannot be sent. An operator can
  put a dead letter back with ``requeue_dead_letter()`` at its original place
  (same ``seq``, same ``unique_id``, a fresh attempt budget).

The transactionId convention
----------------------------
A transaction started offline has no central-system transactionId until its
StartTransaction is answered, yet its MeterValues and StopTransaction must be
queued right away. Every queued message therefore carries ``local_tx_id``
(the station's own transaction id, ``evse.store``'s AUTOINCREMENT id) as a
column, and the queue owns the ``transactionId`` field of StopTransaction and
MeterValues payloads:

* ``enqueue`` stores ``"transactionId": -local_tx_id`` (a placeholder). The
  caller may leave the field out, give the placeholder, or give the real id
  when it knows it; anything else is refused.
* ``delivered()`` of a StartTransaction records ``local_tx_id ->
  response["transactionId"]`` (``ocpp_tx_ids``) in the same SQLite
  transaction that removes the message, so there is no moment at which the
  Start is gone and its id unknown.
* ``payload_for_sending()`` replaces the field with the real id, looked up by
  the ``local_tx_id`` column, not by the sign of the stored value, so a
  central system that hands out zero or negative ids (the schema only says
  integer) still works. A message whose real id is unknown is refused there
  rather than sent with a placeholder.

The stored payload stays a complete, schema-shaped request (StopTransaction
requires ``transactionId``) whose placeholder is recognisable as one if it
ever leaked; substituting by column makes that leak impossible. FIFO order
and the cascade make the refusal unreachable in normal operation: a Start is
always older than its transaction's other messages, so it is delivered or
dead before they reach the head. ``enqueue`` keeps this true: one Start per
local transaction, no Stop or MeterValues without a Start (queued, delivered
or dead), and a message of a transaction whose Start is already dead goes
straight to the dead letters.

Threads and the file
--------------------
The methods are synchronous; trio code calls them through
``trio.to_thread.run_sync``. There is one connection (``check_same_thread=
False``, SQLite autocommit mode) and a ``threading.Lock`` around every use
of it. ``evse.store.Store`` has its own connection to the same file; SQLite's
locks serialize the two, and each connection waits for the other
(``busy_timeout``) rather than failing with "database is locked": every
write here starts with ``BEGIN IMMEDIATE``, which takes the write lock
first, so a read never has to be upgraded to a write (an upgrade could not
wait). ``PRAGMA user_version`` belongs to ``evse.store``; this module's schema
version is the ``schema_version`` row of ``ocpp_meta``, and its migrations run
like the store's: one committed SQLite transaction each, version read inside it.

Every ``sqlite3.Error`` is translated into ``QueueError`` naming the file and
what was being done; refusals are ``QueueError`` too. Times are UTC,
fixed-width ISO-8601 text with microseconds and a ``Z``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from ocpp16.errors import QueueError
from ocpp16.sqlite import SqliteAccess


class MessageKind(StrEnum):
    """The transaction-related messages, by OCPP action name."""

    START = "StartTransaction"
    STOP = "StopTransaction"
    METER_VALUES = "MeterValues"


#: Why a message of a transaction died with its StartTransaction.
CASCADE_REASON: Final = "its StartTransaction was not delivered"

#: Messages whose payload ``transactionId`` the queue fills in at send time.
_FOLLOWERS: Final = frozenset({MessageKind.STOP, MessageKind.METER_VALUES})

# The same columns, in the same order, in ocpp_queue, ocpp_dead_letters and
# ocpp_delivered, so a message moves between them with INSERT ... SELECT.
_COLUMNS: Final = (
    "seq, action, payload, local_tx_id, unique_id, dedupe_key, attempts, created_at, last_error"
)
_Row = tuple[int, str, str, int, str, str | None, int, str, str | None]


def _message_table(name: str, extra: str = "") -> str:
    # The CHECKs hold the invariants in the file itself, whoever writes it.
    return f"""
        CREATE TABLE {name} (
            seq         INTEGER PRIMARY KEY{" AUTOINCREMENT" if name == "ocpp_queue" else ""},
            action      TEXT NOT NULL CHECK (action IN
                            ('StartTransaction', 'StopTransaction', 'MeterValues')),
            payload     TEXT NOT NULL CHECK (json_valid(payload)
                            AND json_type(payload) = 'object'),
            local_tx_id INTEGER NOT NULL CHECK (typeof(local_tx_id) = 'integer'
                            AND local_tx_id >= 1),
            unique_id   TEXT NOT NULL UNIQUE CHECK (typeof(unique_id) = 'text'
                            AND length(unique_id) BETWEEN 1 AND 36),
            dedupe_key  TEXT UNIQUE CHECK (dedupe_key IS NULL
                            OR (typeof(dedupe_key) = 'text' AND dedupe_key <> '')),
            attempts    INTEGER NOT NULL CHECK (typeof(attempts) = 'integer'
                            AND attempts >= 0),
            created_at  TEXT NOT NULL CHECK (created_at LIKE '____-__-__T__:__:__.______Z'),
            last_error  TEXT{extra}
        )
    """


# Migrations of the ocpp_ tables: MIGRATIONS[n] takes schema_version n to
# n + 1, in one transaction. Append only; never edit a released migration.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: the queue, dead letters, delivered keys and the transaction id map.
    (
        # Pending messages only. AUTOINCREMENT: a seq is never reused, so FIFO
        # order survives deliveries, and a requeued dead letter keeps its seq.
        _message_table("ocpp_queue"),
        "CREATE INDEX ocpp_queue_by_transaction ON ocpp_queue (local_tx_id)",
        _message_table(
            "ocpp_dead_letters",
            """,
            reason      TEXT NOT NULL CHECK (typeof(reason) = 'text'),
            died_at     TEXT NOT NULL CHECK (died_at LIKE '____-__-__T__:__:__.______Z')""",
        ),
        "CREATE INDEX ocpp_dead_letters_by_transaction ON ocpp_dead_letters (local_tx_id)",
        # Delivered messages that had a dedupe key: the key stays used.
        _message_table(
            "ocpp_delivered",
            """,
            delivered_at TEXT NOT NULL CHECK (delivered_at LIKE '____-__-__T__:__:__.______Z'),
            CHECK (dedupe_key IS NOT NULL)""",
        ),
        """
        CREATE TABLE ocpp_tx_ids (
            local_tx_id    INTEGER PRIMARY KEY CHECK (typeof(local_tx_id) = 'integer'
                               AND local_tx_id >= 1),
            transaction_id INTEGER NOT NULL CHECK (typeof(transaction_id) = 'integer'),
            recorded_at    TEXT NOT NULL CHECK (recorded_at LIKE '____-__-__T__:__:__.______Z')
        )
        """,
    ),
)

#: The schema version of the ocpp_ tables this code writes and understands.
SCHEMA_VERSION: Final = len(MIGRATIONS)

_SYNCHRONOUS_FULL: Final = 2
#: How long a write waits for the other connection (evse.store's) to commit.
BUSY_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True)
class QueuedMessage:
    """One transaction message as queued (``payload`` as stored: placeholder ids)."""

    seq: int
    action: str
    payload: dict[str, Any]
    local_tx_id: int
    unique_id: str  # the OCPP-J message id of every send of this message
    attempts: int  # CALLERRORs and timeouts so far
    created_at: datetime
    last_error: str | None


@dataclass(frozen=True)
class DeadLetter:
    """A message given up on; ``requeue_dead_letter`` puts it back."""

    seq: int
    action: str
    payload: dict[str, Any]
    local_tx_id: int
    unique_id: str
    attempts: int
    reason: str
    died_at: datetime
    created_at: datetime


def _to_text(at: datetime) -> str:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at.isoformat()} (a timezone is required)")
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _from_text(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    if at.utcoffset() != timedelta(0):
        raise ValueError(f"stored time {text!r} is not UTC")
    return at.astimezone(UTC)


def _error(message: str, *, path: Path) -> QueueError:
    return QueueError(str(path), message)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _message(row: _Row) -> QueuedMessage:
    payload: dict[str, Any] = json.loads(row[2])
    return QueuedMessage(
        seq=row[0],
        action=row[1],
        payload=payload,
        local_tx_id=row[3],
        unique_id=row[4],
        attempts=row[6],
        created_at=_from_text(row[7]),
        last_error=row[8],
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _connect(path: str | Path) -> tuple[Path, sqlite3.Connection]:
    """The connection each queue of the station's file opens, the file checked first
    (a missing directory or a directory in its place named as such)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise _error(f"directory {path.parent} does not exist", path=path.parent)
    if path.is_dir():
        raise _error("is a directory, not a database file", path=path)
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
        )
    except sqlite3.Error as exc:
        raise _error(f"cannot open: {exc}", path=path) from exc
    return path, conn


class _QueueFile(SqliteAccess):
    """What both queues of the station's file share: closing, the file's path."""

    def close(self) -> None:
        """Close the connection; later calls raise QueueError. Closing twice is harmless."""
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


class TransactionQueue(_QueueFile):
    """The queue in the station's SQLite file. Open with ``TransactionQueue.open(path)``."""

    def __init__(
        self, path: Path, connection: sqlite3.Connection, clock: Callable[[], datetime]
    ) -> None:
        # Use TransactionQueue.open: it sets and verifies the pragmas and migrates.
        self._path = path
        self._conn: sqlite3.Connection | None = connection
        self._lock = threading.Lock()
        self._clock = clock

    # -- opening and closing ------------------------------------------------

    @classmethod
    def open(
        cls, path: str | Path, *, clock: Callable[[], datetime] = _utc_now
    ) -> TransactionQueue:
        """Open (or create) the queue's tables in the file at ``path``.

        ``clock`` gives the wall time stamped on messages (aware datetimes).
        """
        path, conn = _connect(path)
        queue = cls(path, conn, clock)
        try:
            queue._configure()
            queue._migrate()
        except BaseException:
            conn.close()
            raise
        return queue

    @property
    def schema_version(self) -> int:
        """The version of the ocpp_ tables (``ocpp_meta``), not ``user_version``."""
        with self._read("read the schema version") as conn:
            return self._version(conn)

    def pragmas(self) -> dict[str, str | int]:
        """The settings durability depends on, as this connection sees them."""
        with self._read("read the pragmas") as conn:
            return {
                name: conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "busy_timeout")
            }

    # -- the sender's side ------------------------------------------------------

    def enqueue(
        self,
        action: str,
        payload: Mapping[str, Any],
        *,
        local_tx_id: int,
        dedupe_key: str | None = None,
    ) -> QueuedMessage:
        """Queue a message; it is committed to disk when this returns.

        With ``dedupe_key``, a key already used returns the message first
        queued under it (pending, delivered or dead) and adds nothing; a key
        reused for another action or transaction is refused. A Stop or
        MeterValues of a transaction whose StartTransaction is dead goes
        straight to the dead letters (see the module docstring).
        """
        what = f"enqueue {action} of local transaction {local_tx_id}"
        with self._write(what) as conn:
            return self._enqueue(
                conn,
                action,
                payload,
                local_tx_id=local_tx_id,
                dedupe_key=dedupe_key,
            )

    def enqueue_on(
        self,
        conn: sqlite3.Connection,
        action: str,
        payload: Mapping[str, Any],
        *,
        local_tx_id: int,
        dedupe_key: str | None = None,
    ) -> QueuedMessage:
        """``enqueue`` inside another connection's open write transaction on the same
        file (the station's store, writing a transaction record and its message in
        one commit). Committed with the caller's transaction, never on its own."""
        if not conn.in_transaction:
            raise _error(
                f"enqueue {action} of local transaction {local_tx_id}: the connection"
                " is not in a transaction",
                path=self._path,
            )
        with self._translate(f"enqueue {action} of local transaction {local_tx_id}"):
            return self._enqueue(
                conn, action, payload, local_tx_id=local_tx_id, dedupe_key=dedupe_key
            )

    def has_message_on(self, conn: sqlite3.Connection, dedupe_key: str) -> bool:
        """``has_message`` inside the caller's transaction."""
        with self._translate(f"look up dedupe key {dedupe_key!r}"):
            return self._keyed(conn, dedupe_key) is not None

    def _enqueue(
        self,
        conn: sqlite3.Connection,
        action: str,
        payload: Mapping[str, Any],
        *,
        local_tx_id: int,
        dedupe_key: str | None,
    ) -> QueuedMessage:
        what = f"enqueue {action} of local transaction {local_tx_id}"
        kind = self._kind(what, action)
        if not _is_int(local_tx_id) or local_tx_id < 1:
            raise _error(
                f"{what}: the local transaction id must be an integer >= 1", path=self._path
            )
        if dedupe_key is not None and (not isinstance(dedupe_key, str) or not dedupe_key):
            raise _error(f"{what}: the dedupe key must be a non-empty text", path=self._path)
        if not isinstance(payload, Mapping):
            raise _error(f"{what}: the payload must be a JSON object", path=self._path)
        body = dict(payload)
        given = "transactionId" in body
        supplied = body.get("transactionId")
        if kind in _FOLLOWERS:
            body["transactionId"] = -local_tx_id
        text = self._json(what, body)
        if dedupe_key is not None:
            existing = self._keyed(conn, dedupe_key)
            if existing is not None:
                if (existing.action, existing.local_tx_id) != (kind.value, local_tx_id):
                    raise _error(
                        f"{what}: dedupe key {dedupe_key!r} already names message"
                        f" {existing.seq} ({existing.action} of local transaction"
                        f" {existing.local_tx_id})",
                        path=self._path,
                    )
                return existing
        real = self._real_id(conn, local_tx_id)
        start = self._start_seqs(conn, local_tx_id)
        if kind is MessageKind.START:
            if real is not None or start != (None, None):
                raise _error(f"{what}: it already has a StartTransaction", path=self._path)
        else:
            if given and not (_is_int(supplied) and supplied in (-local_tx_id, real)):
                raise _error(
                    f"{what}: transactionId {supplied!r} is neither the placeholder"
                    f" {-local_tx_id} nor the central system's id {real!r}",
                    path=self._path,
                )
            if real is None and start == (None, None):
                raise _error(f"{what}: it has no StartTransaction", path=self._path)
        now = self._now(what)
        cursor = conn.execute(
            "INSERT INTO ocpp_queue (action, payload, local_tx_id, unique_id, dedupe_key,"
            " attempts, created_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
            (kind.value, text, local_tx_id, str(uuid.uuid4()), dedupe_key, now),
        )
        seq = cursor.lastrowid
        assert seq is not None
        message = self._pending(conn, seq)
        if kind is not MessageKind.START and start[1] is not None:
            # Its Start is dead: so is this message (never sent with a placeholder).
            self._kill(conn, seq, CASCADE_REASON, now)
        return message

    def head(self) -> QueuedMessage | None:
        """The oldest undelivered message, or None when the queue is empty."""
        with self._read("read the head of the queue") as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM ocpp_queue ORDER BY seq LIMIT 1"  # noqa: S608
            ).fetchone()
        return None if row is None else _message(row)

    def payload_for_sending(self, msg: QueuedMessage) -> dict[str, Any]:
        """The payload to send: StopTransaction and MeterValues get the real transactionId.

        Refused (QueueError) when the central system's id of the message's
        transaction is not known yet: a placeholder is never sent.
        """
        kind = self._kind(f"prepare message {msg.seq}", msg.action)
        payload = dict(msg.payload)
        if kind in _FOLLOWERS:
            real = self.real_transaction_id(msg.local_tx_id)
            if real is None:
                raise _error(
                    f"prepare message {msg.seq} ({msg.action}): the transactionId of local"
                    f" transaction {msg.local_tx_id} is not known (its StartTransaction was"
                    " not delivered)",
                    path=self._path,
                )
            payload["transactionId"] = real
        return payload

    def delivered(self, seq: int, response: Mapping[str, Any]) -> None:
        """The CALLRESULT of message ``seq`` was received: remove it, in one commit
        with, for a StartTransaction, the central system's transactionId."""
        what = f"record message {seq} as delivered"
        with self._write(what) as conn:
            message = self._pending(conn, seq)
            if message.action == MessageKind.START:
                tx_id = response.get("transactionId") if isinstance(response, Mapping) else None
                if not _is_int(tx_id):
                    raise _error(
                        f"{what}: the StartTransaction response has no integer transactionId"
                        f" ({tx_id!r})",
                        path=self._path,
                    )
                conn.execute(
                    "INSERT INTO ocpp_tx_ids (local_tx_id, transaction_id, recorded_at)"
                    " VALUES (?, ?, ?)",
                    (message.local_tx_id, tx_id, self._now(what)),
                )
            conn.execute(
                f"INSERT INTO ocpp_delivered ({_COLUMNS}, delivered_at)"  # noqa: S608
                f" SELECT {_COLUMNS}, ? FROM ocpp_queue WHERE seq = ? AND dedupe_key IS NOT NULL",
                (self._now(what), seq),
            )
            conn.execute("DELETE FROM ocpp_queue WHERE seq = ?", (seq,))

    def failed(self, seq: int, reason: str, *, max_attempts: int) -> bool:
        """Count a failed attempt (CALLERROR or timeout while connected).

        At ``max_attempts`` the message moves to the dead letters, and a
        StartTransaction takes its transaction's later messages with it; True
        is returned then.
        """
        what = f"record a failed attempt of message {seq}"
        if not _is_int(max_attempts) or max_attempts < 1:
            raise _error(f"{what}: max_attempts {max_attempts!r} is not >= 1", path=self._path)
        if not isinstance(reason, str):
            raise _error(f"{what}: the reason must be text", path=self._path)
        with self._write(what) as conn:
            message = self._pending(conn, seq)
            conn.execute(
                "UPDATE ocpp_queue SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (reason, seq),
            )
            if message.attempts + 1 < max_attempts:
                return False
            now = self._now(what)
            self._kill(conn, seq, reason, now)
            if message.action == MessageKind.START:
                followers = [
                    row[0]
                    for row in conn.execute(
                        "SELECT seq FROM ocpp_queue WHERE local_tx_id = ? ORDER BY seq",
                        (message.local_tx_id,),
                    )
                ]
                for follower in followers:
                    self._kill(conn, follower, CASCADE_REASON, now)
            return True

    # -- reading ----------------------------------------------------------------

    def real_transaction_id(self, local_tx_id: int) -> int | None:
        """The central system's transactionId of a local transaction, once known."""
        with self._read(f"read the transactionId of local transaction {local_tx_id}") as conn:
            return self._real_id(conn, local_tx_id)

    def has_message(self, dedupe_key: str) -> bool:
        """Whether a message was ever queued under this key (pending, delivered or dead)."""
        with self._read(f"look up dedupe key {dedupe_key!r}") as conn:
            return self._keyed(conn, dedupe_key) is not None

    def pending(self, limit: int = 1000) -> list[QueuedMessage]:
        """The first ``limit`` undelivered messages, in sending order."""
        self._check_limit("list pending messages", limit)
        with self._read("list pending messages") as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM ocpp_queue ORDER BY seq LIMIT ?",  # noqa: S608
                (limit,),
            ).fetchall()
        return [_message(row) for row in rows]

    def pending_count(self) -> int:
        with self._read("count pending messages") as conn:
            return int(conn.execute("SELECT count(*) FROM ocpp_queue").fetchone()[0])

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """The first ``limit`` dead letters, in their original order."""
        self._check_limit("list dead letters", limit)
        with self._read("list dead letters") as conn:
            rows = conn.execute(
                "SELECT seq, action, payload, local_tx_id, unique_id, attempts, reason, died_at,"
                " created_at FROM ocpp_dead_letters ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            DeadLetter(
                seq=row[0],
                action=row[1],
                payload=json.loads(row[2]),
                local_tx_id=row[3],
                unique_id=row[4],
                attempts=row[5],
                reason=row[6],
                died_at=_from_text(row[7]),
                created_at=_from_text(row[8]),
            )
            for row in rows
        ]

    # -- the operator's side ----------------------------------------------------

    def requeue_dead_letter(self, seq: int) -> QueuedMessage:
        """Put a dead letter back at its place in the order (same seq, same unique_id).

        Its attempts start again from 0; ``last_error`` says why it had died.
        Requeuing a StartTransaction brings back the dead messages of its
        transaction too (they died with it). A Stop or MeterValues whose Start
        is still dead is refused: requeue the Start.
        """
        what = f"requeue dead letter {seq}"
        with self._write(what) as conn:
            row = conn.execute(
                "SELECT action, local_tx_id FROM ocpp_dead_letters WHERE seq = ?", (seq,)
            ).fetchone()
            if row is None:
                raise _error(f"{what}: there is no such dead letter", path=self._path)
            action, local_tx_id = str(row[0]), int(row[1])
            if action == MessageKind.START:
                seqs = [
                    int(r[0])
                    for r in conn.execute(
                        "SELECT seq FROM ocpp_dead_letters WHERE local_tx_id = ?", (local_tx_id,)
                    )
                ]
            else:
                dead_start = self._start_seqs(conn, local_tx_id)[1]
                if dead_start is not None:
                    raise _error(
                        f"{what}: its StartTransaction (dead letter {dead_start}) is dead;"
                        " requeue that first",
                        path=self._path,
                    )
                seqs = [seq]
            for each in seqs:
                conn.execute(
                    f"INSERT INTO ocpp_queue ({_COLUMNS})"  # noqa: S608
                    " SELECT seq, action, payload, local_tx_id, unique_id, dedupe_key, 0,"
                    " created_at, reason FROM ocpp_dead_letters WHERE seq = ?",
                    (each,),
                )
                conn.execute("DELETE FROM ocpp_dead_letters WHERE seq = ?", (each,))
            return self._pending(conn, seq)

    # -- internals ------------------------------------------------------------

    def _configure(self) -> None:
        """Set and verify the pragmas the durability rule depends on."""
        with self._read("configure") as conn:
            # Reading the header first turns a file that is not a database
            # into an error that says so, before any pragma is attempted.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            if mode != "wal":
                raise _error(
                    f"cannot enable WAL journal mode (the file stays in {mode!r} mode)",
                    path=self._path,
                )
            conn.execute("PRAGMA synchronous = FULL")
            sync = int(conn.execute("PRAGMA synchronous").fetchone()[0])
            if sync != _SYNCHRONOUS_FULL:
                raise _error(f"synchronous is {sync}, not FULL (2)", path=self._path)
            wanted = round(BUSY_TIMEOUT_S * 1000)
            busy = int(conn.execute(f"PRAGMA busy_timeout = {wanted:d}").fetchone()[0])
            if busy != wanted:
                raise _error(f"busy_timeout is {busy} ms, not {wanted}", path=self._path)
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise _error(f"damaged: {'; '.join(problems[:5])}", path=self._path)

    def _migrate(self) -> None:
        """Bring the ocpp_ tables to SCHEMA_VERSION, one committed migration at a time.

        ``ocpp_meta`` is created (if missing) and the version read inside each
        migration's transaction, so two processes opening a new file at once
        cannot both apply a migration.
        """
        while True:
            with self._write("migrate the queue's schema") as conn:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS ocpp_meta ("
                    " key TEXT PRIMARY KEY NOT NULL CHECK (typeof(key) = 'text'),"
                    " value INTEGER NOT NULL)"
                )
                version = self._version(conn)
                if version > SCHEMA_VERSION:
                    raise _error(
                        f"queue schema version {version} is newer than this firmware's"
                        f" {SCHEMA_VERSION}",
                        path=self._path,
                    )
                if version == SCHEMA_VERSION:
                    return
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO ocpp_meta (key, value) VALUES ('schema_version', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (version + 1,),
                )

    @staticmethod
    def _version(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM ocpp_meta WHERE key = 'schema_version'").fetchone()
        return 0 if row is None else int(row[0])

    _closed_message = "the queue is closed"

    def _fail(self, message: str) -> Exception:
        return _error(message, path=self._path)

    def _kind(self, what: str, action: str) -> MessageKind:
        try:
            return MessageKind(action)
        except ValueError:
            raise _error(
                f"{what}: {action!r} is not a transaction message"
                f" ({', '.join(kind.value for kind in MessageKind)})",
                path=self._path,
            ) from None

    def _json(self, what: str, body: dict[str, Any]) -> str:
        try:
            return json.dumps(body, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _error(f"{what}: the payload is not JSON: {exc}", path=self._path) from exc

    def _now(self, what: str) -> str:
        try:
            return _to_text(self._clock())
        except (ValueError, OverflowError, AttributeError) as exc:
            raise _error(f"{what}: bad clock reading: {exc}", path=self._path) from exc

    def _check_limit(self, what: str, limit: int) -> None:
        if not _is_int(limit) or limit < 0:
            raise _error(f"{what}: limit {limit!r} is not an integer >= 0", path=self._path)

    def _pending(self, conn: sqlite3.Connection, seq: int) -> QueuedMessage:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM ocpp_queue WHERE seq = ?",  # noqa: S608
            (seq,),
        ).fetchone()
        if row is None:
            raise _error(
                f"message {seq} is not pending (delivered, dead or never queued)", path=self._path
            )
        return _message(row)

    def _keyed(self, conn: sqlite3.Connection, dedupe_key: str) -> QueuedMessage | None:
        for table in ("ocpp_queue", "ocpp_dead_letters", "ocpp_delivered"):
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM {table} WHERE dedupe_key = ?",  # noqa: S608
                (dedupe_key,),
            ).fetchone()
            if row is not None:
                return _message(row)
        return None

    @staticmethod
    def _real_id(conn: sqlite3.Connection, local_tx_id: int) -> int | None:
        row = conn.execute(
            "SELECT transaction_id FROM ocpp_tx_ids WHERE local_tx_id = ?", (local_tx_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _start_seqs(conn: sqlite3.Connection, local_tx_id: int) -> tuple[int | None, int | None]:
        """The seq of the transaction's StartTransaction if pending, and if dead."""
        found: list[int | None] = []
        for table in ("ocpp_queue", "ocpp_dead_letters"):
            row = conn.execute(
                f"SELECT seq FROM {table}"  # noqa: S608
                " WHERE local_tx_id = ? AND action = 'StartTransaction'",
                (local_tx_id,),
            ).fetchone()
            found.append(None if row is None else int(row[0]))
        return found[0], found[1]

    @staticmethod
    def _kill(conn: sqlite3.Connection, seq: int, reason: str, now: str) -> None:
        """Move a pending message to the dead letters (inside the caller's transaction)."""
        conn.execute(
            f"INSERT INTO ocpp_dead_letters ({_COLUMNS}, reason, died_at)"  # noqa: S608
            f" SELECT {_COLUMNS}, ?, ? FROM ocpp_queue WHERE seq = ?",
            (reason, now, seq),
        )
        conn.execute("DELETE FROM ocpp_queue WHERE seq = ?", (seq,))


# -- security events ------------------------------------------------------------------------
#
# SecurityEventNotification (OCPP 1.6 Security Whitepaper ed. 3, "Security events") is
# queued here too, in the same file, but in a table of its own rather than as a fourth
# kind of ``ocpp_queue``: that table's rules are the transaction messages' (a local
# transaction id on every row, a Start before its followers, the cascade of a dead
# Start, dedupe keys), none of which a security event has, and one FIFO for both would
# make an event wait behind a StartTransaction being retried (and the reverse), while
# OCPP 1.6 §4.10's order concerns transaction messages only. The guarantees kept:
#
# * **On disk when ``enqueue`` returns**, like a transaction message (BEGIN IMMEDIATE ...
#   COMMIT, WAL, synchronous=FULL).
# * **FIFO among security events**: ``seq`` is AUTOINCREMENT; ``head()`` is the oldest.
# * **The message id is fixed at enqueue**, so a resend after a crash is the same message.
# * **Critical events are never dropped.** The queue holds at most ``cap`` events; a new
#   event over the cap removes the oldest *non-critical* pending ones (the whitepaper's
#   table marks each event critical or not). With only critical events queued, a new
#   non-critical one is not queued at all, and a critical one is queued over the cap.
#   What was removed is returned, for the caller's log line.
# * **Given up after a refusal, kept in sight.** ``failed()`` counts a CALLERROR or a
#   timeout while connected; at ``max_attempts`` the event moves to
#   ``ocpp_security_dead`` (the newest ``SECURITY_DEAD_KEEP`` are kept) in the same
#   transaction. The security log file still holds it.
#
# The table's version is the ``security_events_schema_version`` row of ``ocpp_meta``
# (the way ocpp16/profile_store.py keeps its own), so opening the transaction queue alone
# never creates these tables.

#: How many given-up security events are kept (the newest), for the diagnostics summary.
SECURITY_DEAD_KEEP: Final = 100
_SECURITY_VERSION_KEY: Final = "security_events_schema_version"
_SECURITY_COLUMNS: Final = (
    "seq, event_type, payload, critical, unique_id, attempts, created_at, last_error"
)
_SecurityRow = tuple[int, str, str, int, str, int, str, str | None]


def _security_table(name: str, extra: str = "") -> str:
    # AUTOINCREMENT in the pending table: a seq is never reused, so the order holds.
    increment = " AUTOINCREMENT" if name == "ocpp_security_events" else ""
    return f"""
        CREATE TABLE {name} (
            seq         INTEGER PRIMARY KEY{increment},
            event_type  TEXT NOT NULL CHECK (typeof(event_type) = 'text'
                            AND length(event_type) BETWEEN 1 AND 50),
            payload     TEXT NOT NULL CHECK (json_valid(payload)
                            AND json_type(payload) = 'object'),
            critical    INTEGER NOT NULL CHECK (critical IN (0, 1)),
            unique_id   TEXT NOT NULL UNIQUE CHECK (typeof(unique_id) = 'text'
                            AND length(unique_id) BETWEEN 1 AND 36),
            attempts    INTEGER NOT NULL CHECK (typeof(attempts) = 'integer'
                            AND attempts >= 0),
            created_at  TEXT NOT NULL CHECK (created_at LIKE '____-__-__T__:__:__.______Z'),
            last_error  TEXT{extra}
        )
    """


# Migrations of the security event tables: SECURITY_MIGRATIONS[n] takes their version n
# to n + 1, in one transaction. Append only; never edit a released migration.
SECURITY_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        _security_table("ocpp_security_events"),
        # The cap removes the oldest non-critical event: found by this index.
        "CREATE INDEX ocpp_security_events_by_critical ON ocpp_security_events (critical, seq)",
        _security_table(
            "ocpp_security_dead",
            """,
            reason      TEXT NOT NULL CHECK (typeof(reason) = 'text'),
            died_at     TEXT NOT NULL CHECK (died_at LIKE '____-__-__T__:__:__.______Z')""",
        ),
    ),
)

#: The version of the security event tables this code writes and understands.
SECURITY_SCHEMA_VERSION: Final = len(SECURITY_MIGRATIONS)


@dataclass(frozen=True)
class QueuedSecurityEvent:
    """One SecurityEventNotification as queued (``payload`` is the request, as stored)."""

    seq: int
    event_type: str
    payload: dict[str, Any]
    critical: bool
    unique_id: str  # the OCPP-J message id of every send of this event
    attempts: int
    created_at: datetime
    last_error: str | None


@dataclass(frozen=True)
class SecurityEnqueued:
    """What ``SecurityEventQueue.enqueue`` did."""

    #: The event as queued; None when it was itself dropped (non-critical, and the
    #: queue full of critical events).
    queued: QueuedSecurityEvent | None
    #: Older non-critical events removed to keep the cap, oldest first.
    dropped: tuple[QueuedSecurityEvent, ...] = ()


@dataclass(frozen=True)
class DeadSecurityEvent:
    """A security event given up on (refused ``max_attempts`` times)."""

    seq: int
    event_type: str
    critical: bool
    attempts: int
    reason: str
    created_at: datetime
    died_at: datetime


def _security_event(row: _SecurityRow) -> QueuedSecurityEvent:
    payload: dict[str, Any] = json.loads(row[2])
    return QueuedSecurityEvent(
        seq=row[0],
        event_type=row[1],
        payload=payload,
        critical=bool(row[3]),
        unique_id=row[4],
        attempts=row[5],
        created_at=_from_text(row[6]),
        last_error=row[7],
    )


class SecurityEventQueue(_QueueFile):
    """Queued SecurityEventNotifications in the station's SQLite file (see the comment
    above ``SECURITY_MIGRATIONS``). Open with ``SecurityEventQueue.open(path)``; the
    methods are synchronous (trio code calls them in a worker thread)."""

    _closed_message = "the security event queue is closed"

    def __init__(
        self, path: Path, connection: sqlite3.Connection, clock: Callable[[], datetime]
    ) -> None:
        # Use SecurityEventQueue.open: it sets and verifies the pragmas and migrates.
        self._path = path
        self._conn: sqlite3.Connection | None = connection
        self._lock = threading.Lock()
        self._clock = clock

    @classmethod
    def open(
        cls, path: str | Path, *, clock: Callable[[], datetime] = _utc_now
    ) -> SecurityEventQueue:
        """Open (or create) the security event tables in the file at ``path``."""
        path, conn = _connect(path)
        queue = cls(path, conn, clock)
        try:
            queue._configure()
            queue._migrate()
        except BaseException:
            conn.close()
            raise
        return queue

    @property
    def schema_version(self) -> int:
        """The version of the security event tables (their ``ocpp_meta`` row)."""
        with self._read("read the security events' schema version") as conn:
            return self._version(conn)

    # -- the emitter's side -------------------------------------------------------------

    def enqueue(
        self, event_type: str, payload: Mapping[str, Any], *, critical: bool, cap: int
    ) -> SecurityEnqueued:
        """Queue a SecurityEventNotification; committed to disk when this returns.

        Past ``cap`` pending events the oldest non-critical ones make room (returned in
        ``dropped``); a critical event is always queued.
        """
        what = f"enqueue security event {event_type!r}"
        if not isinstance(event_type, str) or not 1 <= len(event_type) <= 50:
            raise _error(f"{what}: the type must be a text of 1..50 characters", path=self._path)
        if not _is_int(cap) or cap < 1:
            raise _error(f"{what}: cap {cap!r} is not an integer >= 1", path=self._path)
        if not isinstance(payload, Mapping):
            raise _error(f"{what}: the payload must be a JSON object", path=self._path)
        try:
            text = json.dumps(dict(payload), separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _error(f"{what}: the payload is not JSON: {exc}", path=self._path) from exc
        with self._write(what) as conn:
            now = self._now(what)
            count = int(conn.execute("SELECT count(*) FROM ocpp_security_events").fetchone()[0])
            excess = count + 1 - cap
            dropped: list[QueuedSecurityEvent] = []
            if excess > 0:
                rows = conn.execute(
                    f"SELECT {_SECURITY_COLUMNS} FROM ocpp_security_events"  # noqa: S608
                    " WHERE critical = 0 ORDER BY seq LIMIT ?",
                    (excess,),
                ).fetchall()
                dropped = [_security_event(row) for row in rows]
                conn.executemany(
                    "DELETE FROM ocpp_security_events WHERE seq = ?", [(e.seq,) for e in dropped]
                )
                if not critical and len(dropped) < excess:
                    # Nothing but critical events to make room with: this one goes.
                    return SecurityEnqueued(None, tuple(dropped))
            cursor = conn.execute(
                "INSERT INTO ocpp_security_events (event_type, payload, critical, unique_id,"
                " attempts, created_at) VALUES (?, ?, ?, ?, 0, ?)",
                (event_type, text, int(bool(critical)), str(uuid.uuid4()), now),
            )
            seq = cursor.lastrowid
            assert seq is not None
            return SecurityEnqueued(self._security_pending(conn, seq), tuple(dropped))

    # -- the sender's side --------------------------------------------------------------

    def head(self) -> QueuedSecurityEvent | None:
        """The oldest pending security event, or None."""
        with self._read("read the head of the security events") as conn:
            row = conn.execute(
                f"SELECT {_SECURITY_COLUMNS} FROM ocpp_security_events"  # noqa: S608
                " ORDER BY seq LIMIT 1"
            ).fetchone()
        return None if row is None else _security_event(row)

    def delivered(self, seq: int) -> bool:
        """The CALLRESULT of event ``seq`` came: remove it. False when it was no longer
        pending (dropped by the cap while it was in flight)."""
        with self._write(f"record security event {seq} as delivered") as conn:
            cursor = conn.execute("DELETE FROM ocpp_security_events WHERE seq = ?", (seq,))
            return cursor.rowcount > 0

    def failed(self, seq: int, reason: str, *, max_attempts: int) -> bool:
        """Count a failed attempt (CALLERROR or timeout while connected). At
        ``max_attempts`` the event moves to the given-up table; True then, and when
        the event was no longer pending."""
        what = f"record a failed attempt of security event {seq}"
        if not _is_int(max_attempts) or max_attempts < 1:
            raise _error(f"{what}: max_attempts {max_attempts!r} is not >= 1", path=self._path)
        if not isinstance(reason, str):
            raise _error(f"{what}: the reason must be text", path=self._path)
        with self._write(what) as conn:
            row = conn.execute(
                "SELECT attempts FROM ocpp_security_events WHERE seq = ?", (seq,)
            ).fetchone()
            if row is None:
                return True
            conn.execute(
                "UPDATE ocpp_security_events SET attempts = attempts + 1, last_error = ?"
                " WHERE seq = ?",
                (reason, seq),
            )
            if int(row[0]) + 1 < max_attempts:
                return False
            conn.execute(
                f"INSERT INTO ocpp_security_dead ({_SECURITY_COLUMNS}, reason, died_at)"  # noqa: S608
                f" SELECT {_SECURITY_COLUMNS}, ?, ? FROM ocpp_security_events WHERE seq = ?",
                (reason, self._now(what), seq),
            )
            conn.execute("DELETE FROM ocpp_security_events WHERE seq = ?", (seq,))
            conn.execute(
                "DELETE FROM ocpp_security_dead WHERE seq NOT IN"
                " (SELECT seq FROM ocpp_security_dead ORDER BY seq DESC LIMIT ?)",
                (SECURITY_DEAD_KEEP,),
            )
            return True

    # -- reading --------------------------------------------------------------------------

    def pending(self, limit: int = 1000) -> list[QueuedSecurityEvent]:
        """The first ``limit`` pending events, in sending order."""
        self._check_limit("list pending security events", limit)
        with self._read("list pending security events") as conn:
            rows = conn.execute(
                f"SELECT {_SECURITY_COLUMNS} FROM ocpp_security_events"  # noqa: S608
                " ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [_security_event(row) for row in rows]

    def pending_count(self) -> int:
        with self._read("count pending security events") as conn:
            return int(conn.execute("SELECT count(*) FROM ocpp_security_events").fetchone()[0])

    def dead(self, limit: int = SECURITY_DEAD_KEEP) -> list[DeadSecurityEvent]:
        """The given-up events kept, oldest first."""
        self._check_limit("list given-up security events", limit)
        with self._read("list given-up security events") as conn:
            rows = conn.execute(
                "SELECT seq, event_type, critical, attempts, reason, created_at, died_at"
                " FROM ocpp_security_dead ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            DeadSecurityEvent(
                seq=row[0],
                event_type=row[1],
                critical=bool(row[2]),
                attempts=row[3],
                reason=row[4],
                created_at=_from_text(row[5]),
                died_at=_from_text(row[6]),
            )
            for row in rows
        ]

    # -- internals ------------------------------------------------------------------------

    def _fail(self, message: str) -> Exception:
        return _error(message, path=self._path)

    def _configure(self) -> None:
        """The transaction queue's pragmas, set and verified the same way (this
        connection's own: WAL, synchronous=FULL, busy_timeout)."""
        with self._read("configure") as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            if mode != "wal":
                raise self._fail(
                    f"cannot enable WAL journal mode (the file stays in {mode!r} mode)"
                )
            conn.execute("PRAGMA synchronous = FULL")
            sync = int(conn.execute("PRAGMA synchronous").fetchone()[0])
            if sync != _SYNCHRONOUS_FULL:
                raise self._fail(f"synchronous is {sync}, not FULL (2)")
            wanted = round(BUSY_TIMEOUT_S * 1000)
            busy = int(conn.execute(f"PRAGMA busy_timeout = {wanted:d}").fetchone()[0])
            if busy != wanted:
                raise self._fail(f"busy_timeout is {busy} ms, not {wanted}")

    def _check_limit(self, what: str, limit: int) -> None:
        if not _is_int(limit) or limit < 0:
            raise self._fail(f"{what}: limit {limit!r} is not an integer >= 0")

    def _now(self, what: str) -> str:
        try:
            return _to_text(self._clock())
        except (ValueError, OverflowError, AttributeError) as exc:
            raise _error(f"{what}: bad clock reading: {exc}", path=self._path) from exc

    def _security_pending(self, conn: sqlite3.Connection, seq: int) -> QueuedSecurityEvent:
        row = conn.execute(
            f"SELECT {_SECURITY_COLUMNS} FROM ocpp_security_events WHERE seq = ?",  # noqa: S608
            (seq,),
        ).fetchone()
        if row is None:
            raise _error(f"security event {seq} is not pending", path=self._path)
        return _security_event(row)

    @staticmethod
    def _version(conn: sqlite3.Connection) -> int:
        row = conn.execute(
            "SELECT value FROM ocpp_meta WHERE key = ?", (_SECURITY_VERSION_KEY,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _migrate(self) -> None:
        """Bring the security event tables to SECURITY_SCHEMA_VERSION, one committed
        migration at a time (the version read inside each, as the queue's)."""
        while True:
            with self._write("migrate the security events' schema") as conn:
                # The same definition as the transaction queue's, whichever opens first.
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS ocpp_meta ("
                    " key TEXT PRIMARY KEY NOT NULL CHECK (typeof(key) = 'text'),"
                    " value INTEGER NOT NULL)"
                )
                version = self._version(conn)
                if version > SECURITY_SCHEMA_VERSION:
                    raise _error(
                        f"security event schema version {version} is newer than this"
                        f" firmware's {SECURITY_SCHEMA_VERSION}",
                        path=self._path,
                    )
                if version == SECURITY_SCHEMA_VERSION:
                    return
                for statement in SECURITY_MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO ocpp_meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_SECURITY_VERSION_KEY, version + 1),
                )


__all__ = [
    "CASCADE_REASON",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SECURITY_DEAD_KEEP",
    "SECURITY_MIGRATIONS",
    "SECURITY_SCHEMA_VERSION",
    "DeadLetter",
    "DeadSecurityEvent",
    "MessageKind",
    "QueuedMessage",
    "QueuedSecurityEvent",
    "SecurityEnqueued",
    "SecurityEventQueue",
    "TransactionQueue",
]
