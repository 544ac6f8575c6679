"""The persistent transaction-message queue, on real SQLite files: pragmas and
schema, FIFO, dedupe, transactionId substitution, dead letters and their
cascade, requeue, reopen, sharing the file with evse.store.Store, and a real
kill -9 in the middle of enqueuing and delivering."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from evse import store as evse_store
from evse.store import Store
from ocpp16 import queue as queue_module
from ocpp16.errors import OcppError, QueueError
from ocpp16.queue import (
    CASCADE_REASON,
    SCHEMA_VERSION,
    MessageKind,
    QueuedMessage,
    TransactionQueue,
)
from tests import queue_crash_child as child

START = MessageKind.START
STOP = MessageKind.STOP
METER = MessageKind.METER_VALUES
T0 = datetime(2026, 5, 1, 8, 30, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "station.db"


@pytest.fixture
def queue(db: Path) -> Iterator[TransactionQueue]:
    q = TransactionQueue.open(db)
    yield q
    q.close()


def raw(path: Path) -> sqlite3.Connection:
    """A second, independent connection: sees only what was committed."""
    return sqlite3.connect(path, isolation_level=None)


def tables(path: Path) -> set[str]:
    conn = raw(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()


def start(q: TransactionQueue, tx: int, *, key: bool = True) -> QueuedMessage:
    payload = {"connectorId": 1, "idTag": "TAG1", "meterStart": 100 * tx, "timestamp": "t"}
    return q.enqueue(START, payload, local_tx_id=tx, dedupe_key=f"start:{tx}" if key else None)


def meter(q: TransactionQueue, tx: int, value: int = 0) -> QueuedMessage:
    payload = {"connectorId": 1, "meterValue": [{"sampledValue": [{"value": str(value)}]}]}
    return q.enqueue(METER, payload, local_tx_id=tx)


def stop(q: TransactionQueue, tx: int, reason: str = "Local") -> QueuedMessage:
    payload = {"meterStop": 100 * tx + 50, "timestamp": "t", "reason": reason}
    return q.enqueue(STOP, payload, local_tx_id=tx, dedupe_key=f"stop:{tx}")


def deliver_head(q: TransactionQueue, real_offset: int = 1000) -> QueuedMessage:
    """Play the central system for the head message: Starts get ``real_offset + tx``."""
    msg = q.head()
    assert msg is not None
    response: dict[str, Any] = {}
    if msg.action == START:
        response = {
            "idTagInfo": {"status": "Accepted"},
            "transactionId": real_offset + msg.local_tx_id,
        }
    q.delivered(msg.seq, response)
    return msg


def seqs(messages: list[QueuedMessage]) -> list[int]:
    return [m.seq for m in messages]


# -- opening, pragmas, schema ---------------------------------------------------------


def test_open_sets_and_verifies_wal_full_sync_and_busy_timeout(
    queue: TransactionQueue, db: Path
) -> None:
    assert queue.pragmas() == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "busy_timeout": round(queue_module.BUSY_TIMEOUT_S * 1000),
    }
    assert queue.schema_version == SCHEMA_VERSION >= 1
    assert queue.path == db
    conn = raw(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # The queue keeps its version in ocpp_meta; user_version is evse.store's.
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        assert conn.execute("SELECT key, value FROM ocpp_meta").fetchall() == [
            ("schema_version", SCHEMA_VERSION)
        ]
    finally:
        conn.close()
    own = {t for t in tables(db) if t != "sqlite_sequence"}
    assert own == {"ocpp_meta", "ocpp_queue", "ocpp_dead_letters", "ocpp_delivered", "ocpp_tx_ids"}


def test_a_file_that_cannot_run_in_wal_mode_is_refused() -> None:
    with pytest.raises(QueueError, match="cannot enable WAL") as info:
        TransactionQueue.open(":memory:")
    assert info.value.path == ":memory:"
    assert isinstance(info.value, OcppError)


def test_a_missing_directory_or_a_directory_is_refused_and_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(QueueError, match="does not exist") as info:
        TransactionQueue.open(missing / "station.db")
    assert info.value.path == str(missing)
    assert not missing.exists()
    with pytest.raises(QueueError, match="is a directory") as info:
        TransactionQueue.open(tmp_path)
    assert info.value.path == str(tmp_path)


def test_a_file_that_is_not_a_database_is_refused_and_named(db: Path) -> None:
    db.write_bytes(b"this is not an SQLite file " * 200)
    with pytest.raises(QueueError, match="not a database") as info:
        TransactionQueue.open(db)
    assert info.value.path == str(db)
    assert str(info.value).startswith(f"{db}: ")
    assert isinstance(info.value.__cause__, sqlite3.Error)


def test_a_newer_queue_schema_is_refused(db: Path) -> None:
    TransactionQueue.open(db).close()
    conn = raw(db)
    conn.execute(
        "UPDATE ocpp_meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,)
    )
    conn.close()
    with pytest.raises(QueueError, match="newer than this firmware"):
        TransactionQueue.open(db)


def test_a_failed_migration_leaves_the_file_as_it_was(db: Path) -> None:
    # A table in the way of a later statement of the first migration: the
    # earlier statements, and ocpp_meta itself, are rolled back with it.
    conn = raw(db)
    conn.execute("CREATE TABLE ocpp_tx_ids (x)")
    conn.close()
    with pytest.raises(QueueError, match="migrate"):
        TransactionQueue.open(db)
    assert tables(db) == {"ocpp_tx_ids"}


def test_reopen_does_not_migrate_again(db: Path) -> None:
    with TransactionQueue.open(db) as q:
        start(q, 1)
    with TransactionQueue.open(db) as q:
        assert q.schema_version == SCHEMA_VERSION
        assert q.pending_count() == 1


def test_a_closed_queue_refuses_and_closing_twice_is_harmless(db: Path) -> None:
    with TransactionQueue.open(db) as q:
        pass
    with pytest.raises(QueueError, match="closed"):
        q.head()
    with pytest.raises(QueueError, match="closed"):
        start(q, 1)
    q.close()


# -- FIFO and durability ---------------------------------------------------------------


def test_messages_come_out_in_the_order_they_went_in(queue: TransactionQueue) -> None:
    sent = [
        start(queue, 1),
        meter(queue, 1, 1),
        start(queue, 2),
        meter(queue, 1, 2),
        stop(queue, 2),
    ]
    sent.append(stop(queue, 1))
    assert seqs(sent) == sorted(seqs(sent))
    assert queue.pending() == sent
    assert queue.pending(limit=2) == sent[:2]
    assert queue.pending_count() == len(sent)
    delivered = []
    while queue.head() is not None:
        delivered.append(deliver_head(queue))
    assert delivered == sent
    assert queue.pending_count() == 0
    assert queue.pending() == []


def test_enqueue_is_committed_before_it_returns(queue: TransactionQueue, db: Path) -> None:
    msg = start(queue, 7)
    conn = raw(db)
    try:
        row = conn.execute("SELECT seq, action, local_tx_id, unique_id FROM ocpp_queue").fetchone()
    finally:
        conn.close()
    assert row == (msg.seq, "StartTransaction", 7, msg.unique_id)


def test_delivered_is_committed_before_it_returns(queue: TransactionQueue, db: Path) -> None:
    start(queue, 3)
    deliver_head(queue)
    conn = raw(db)
    try:
        assert conn.execute("SELECT count(*) FROM ocpp_queue").fetchone()[0] == 0
        assert conn.execute("SELECT local_tx_id, transaction_id FROM ocpp_tx_ids").fetchall() == [
            (3, 1003)
        ]
    finally:
        conn.close()


def test_a_message_keeps_its_fields_and_unique_id_across_reopen(db: Path) -> None:
    clock = [T0]
    with TransactionQueue.open(db, clock=lambda: clock[0]) as q:
        first = start(q, 1)
        q.failed(first.seq, "CALLERROR InternalError", max_attempts=3)
        clock[0] = T0 + timedelta(seconds=5)
        second = meter(q, 1, 42)
        sent = q.head()
    assert sent is not None
    # A crash after sending and before delivered(): the same message, same id.
    with TransactionQueue.open(db) as q:
        again = q.head()
        assert again == sent
        assert again.unique_id == first.unique_id
        assert again.attempts == 1 and again.last_error == "CALLERROR InternalError"
        assert again.created_at == T0
        assert q.pending() == [again, second]
        assert second.created_at == T0 + timedelta(seconds=5)


def test_unique_ids_are_uuid4_text_and_distinct(queue: TransactionQueue) -> None:
    messages = [start(queue, tx) for tx in range(1, 30)]
    ids = [m.unique_id for m in messages]
    assert len(set(ids)) == len(ids)
    for text in ids:
        assert len(text) == 36  # the OCPP-J message id is at most 36 characters
        assert uuid.UUID(text).version == 4


# -- dedupe --------------------------------------------------------------------------------


def test_the_same_dedupe_key_twice_returns_the_first_message_and_adds_nothing(
    queue: TransactionQueue,
) -> None:
    assert not queue.has_message("start:1")
    first = start(queue, 1)
    assert queue.has_message("start:1")
    end = stop(queue, 1, reason="Local")
    # The station reports the end again after a crash, maybe differently: the first one wins.
    assert stop(queue, 1, reason="PowerLoss") == end
    assert start(queue, 1) == first
    assert queue.pending() == [first, end]


def test_a_delivered_message_keeps_its_dedupe_key(queue: TransactionQueue, db: Path) -> None:
    first = start(queue, 1)
    end = stop(queue, 1)
    deliver_head(queue)
    deliver_head(queue)
    assert queue.pending_count() == 0
    # Reported again after the central system had it: nothing is sent twice.
    assert stop(queue, 1) == end
    assert start(queue, 1) == first
    assert queue.has_message("stop:1") and queue.has_message("start:1")
    assert queue.pending_count() == 0
    with TransactionQueue.open(db) as again:
        assert again.has_message("stop:1")
        assert stop(again, 1) == end
        assert again.pending_count() == 0


def test_keyless_messages_leave_no_trace_once_delivered(queue: TransactionQueue, db: Path) -> None:
    start(queue, 1, key=False)
    meter(queue, 1)
    deliver_head(queue)
    deliver_head(queue)
    conn = raw(db)
    try:
        assert conn.execute("SELECT count(*) FROM ocpp_delivered").fetchone()[0] == 0
    finally:
        conn.close()


def test_a_dedupe_key_reused_for_another_message_is_refused(queue: TransactionQueue) -> None:
    start(queue, 1)
    start(queue, 2)
    with pytest.raises(QueueError, match="already names message"):
        queue.enqueue(STOP, {"meterStop": 1}, local_tx_id=2, dedupe_key="start:1")
    with pytest.raises(QueueError, match="already names message"):
        queue.enqueue(START, {"meterStart": 1}, local_tx_id=3, dedupe_key="start:1")
    assert queue.pending_count() == 2


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "payload", "tx", "key", "match"),
    [
        ("Heartbeat", {}, 1, None, "not a transaction message"),
        (START, {}, 0, None, "integer >= 1"),
        (START, {}, True, None, "integer >= 1"),
        (START, {}, 2, "", "non-empty"),
        (START, {"x": float("nan")}, 2, None, "not JSON"),
        (START, {"x": {1, 2}}, 2, None, "not JSON"),
        (START, ["not", "an", "object"], 2, None, "JSON object"),
        (START, {}, 1, None, "already has a StartTransaction"),
        (METER, {}, 9, None, "no StartTransaction"),
        (STOP, {}, 9, None, "no StartTransaction"),
        (STOP, {"transactionId": 5}, 1, None, "neither the placeholder"),
        (STOP, {"transactionId": None}, 1, None, "neither the placeholder"),
        (METER, {"transactionId": "-1"}, 1, None, "neither the placeholder"),
    ],
)
def test_bad_messages_are_refused_and_add_nothing(
    queue: TransactionQueue, action: str, payload: Any, tx: int, key: str | None, match: str
) -> None:
    start(queue, 1)
    with pytest.raises(QueueError, match=match) as info:
        queue.enqueue(action, payload, local_tx_id=tx, dedupe_key=key)
    assert info.value.path == str(queue.path)
    assert queue.pending_count() == 1


def test_only_pending_messages_can_be_delivered_or_failed(queue: TransactionQueue) -> None:
    msg = start(queue, 1)
    deliver_head(queue)
    for seq in (msg.seq, 999):
        with pytest.raises(QueueError, match="not pending"):
            queue.delivered(seq, {"transactionId": 1})
        with pytest.raises(QueueError, match="not pending"):
            queue.failed(seq, "timeout", max_attempts=3)
    with pytest.raises(QueueError, match="max_attempts"):
        queue.failed(meter(queue, 1).seq, "timeout", max_attempts=0)
    with pytest.raises(QueueError, match="limit"):
        queue.pending(limit=-1)


@pytest.mark.parametrize(
    "response", [{}, {"transactionId": "12"}, {"transactionId": True}, {"transactionId": None}]
)
def test_a_start_response_without_an_integer_transaction_id_changes_nothing(
    queue: TransactionQueue, response: dict[str, Any]
) -> None:
    msg = start(queue, 1)
    with pytest.raises(QueueError, match="no integer transactionId"):
        queue.delivered(msg.seq, response)
    assert queue.head() == msg
    assert queue.real_transaction_id(1) is None


# -- transactionId placeholder and substitution ---------------------------------------------


def test_messages_of_an_offline_transaction_get_the_real_id_at_send_time(
    queue: TransactionQueue,
) -> None:
    begin = start(queue, 5)
    values = meter(queue, 5, 1)
    end = stop(queue, 5)
    # Stored with the placeholder -local_tx_id, whatever the caller gave.
    assert values.payload["transactionId"] == -5
    assert end.payload == {
        "meterStop": 550,
        "timestamp": "t",
        "reason": "Local",
        "transactionId": -5,
    }
    assert queue.payload_for_sending(begin) == begin.payload
    assert "transactionId" not in queue.payload_for_sending(begin)
    # Before the Start is answered there is no id to send: never the placeholder.
    with pytest.raises(QueueError, match="not known"):
        queue.payload_for_sending(values)
    assert queue.real_transaction_id(5) is None
    queue.delivered(begin.seq, {"idTagInfo": {"status": "Accepted"}, "transactionId": 777})
    assert queue.real_transaction_id(5) == 777
    assert queue.payload_for_sending(values) == {**values.payload, "transactionId": 777}
    assert queue.payload_for_sending(end)["transactionId"] == 777
    assert values.payload["transactionId"] == -5  # the stored message is not changed


def test_the_caller_may_give_the_placeholder_or_the_known_real_id(queue: TransactionQueue) -> None:
    start(queue, 2)
    given_placeholder = queue.enqueue(METER, {"transactionId": -2}, local_tx_id=2)
    deliver_head(queue, real_offset=40)  # real id 42
    given_real = queue.enqueue(METER, {"transactionId": 42}, local_tx_id=2)
    left_out = queue.enqueue(STOP, {"meterStop": 1}, local_tx_id=2)
    for msg in (given_placeholder, given_real, left_out):
        assert msg.payload["transactionId"] == -2
        assert queue.payload_for_sending(msg)["transactionId"] == 42


def test_substitution_keys_on_the_local_id_not_the_sign(queue: TransactionQueue) -> None:
    # The schema only says "integer": a central system handing out 0 or
    # negative ids still gets its own id back.
    start(queue, 1)
    start(queue, 2)
    v1, v2 = meter(queue, 1), meter(queue, 2)
    queue.delivered(queue.pending()[0].seq, {"transactionId": 0})
    queue.delivered(queue.pending()[0].seq, {"transactionId": -1})
    assert queue.payload_for_sending(v1)["transactionId"] == 0
    assert queue.payload_for_sending(v2)["transactionId"] == -1


# -- failures and dead letters ------------------------------------------------------------------


def test_failures_count_until_the_message_dies(db: Path) -> None:
    with TransactionQueue.open(db, clock=lambda: T0) as q:
        start(q, 1)
        deliver_head(q)
        values = meter(q, 1, 1)
        later = meter(q, 1, 2)
        assert q.failed(values.seq, "timeout", max_attempts=3) is False
        assert q.failed(values.seq, "CALLERROR InternalError", max_attempts=3) is False
        head = q.head()
        assert head is not None
        assert (head.seq, head.attempts, head.last_error) == (
            values.seq,
            2,
            "CALLERROR InternalError",
        )
        assert q.failed(values.seq, "CALLERROR GenericError", max_attempts=3) is True
        assert q.pending() == [later]
        (dead,) = q.dead_letters()
    assert dead.seq == values.seq
    assert dead.unique_id == values.unique_id
    assert (dead.action, dead.local_tx_id, dead.payload) == (METER, 1, values.payload)
    assert (dead.attempts, dead.reason, dead.died_at, dead.created_at) == (
        3,
        "CALLERROR GenericError",
        T0,
        T0,
    )


def test_a_lowered_max_attempts_kills_at_once(queue: TransactionQueue) -> None:
    # TransactionMessageAttempts changed from 5 to 1 while a message had failed twice.
    start(queue, 1)
    deliver_head(queue)
    msg = meter(queue, 1)
    queue.failed(msg.seq, "timeout", max_attempts=5)
    queue.failed(msg.seq, "timeout", max_attempts=5)
    assert queue.failed(msg.seq, "timeout", max_attempts=1) is True
    assert queue.dead_letters()[0].attempts == 3


def test_a_dead_start_takes_its_transaction_with_it_and_nothing_else(
    queue: TransactionQueue,
) -> None:
    s1 = start(queue, 1)
    m1 = meter(queue, 1, 1)
    s2 = start(queue, 2)
    m1b = meter(queue, 1, 2)
    m2 = meter(queue, 2, 1)
    e1 = stop(queue, 1)
    assert queue.failed(s1.seq, "CALLERROR SecurityError", max_attempts=1) is True
    assert queue.pending() == [s2, m2]
    dead = queue.dead_letters()
    assert [d.seq for d in dead] == seqs([s1, m1, m1b, e1])
    assert [d.reason for d in dead] == ["CALLERROR SecurityError"] + [CASCADE_REASON] * 3
    assert [d.attempts for d in dead] == [1, 0, 0, 0]
    assert [d.unique_id for d in dead] == [m.unique_id for m in (s1, m1, m1b, e1)]
    # Reported later, e.g. after a crash: a message of the dead transaction is
    # kept, in the dead letters, not sent with a placeholder and not dropped.
    late = meter(queue, 1, 3)
    assert queue.pending() == [s2, m2]
    assert queue.dead_letters()[-1].seq == late.seq
    assert queue.dead_letters()[-1].reason == CASCADE_REASON
    assert stop(queue, 1) == e1  # its key still names the dead Stop
    assert queue.has_message("stop:1")
    # Transaction 2 goes on untouched.
    deliver_head(queue)
    assert queue.payload_for_sending(m2)["transactionId"] == 1002


# -- requeue -----------------------------------------------------------------------------------


def test_a_requeued_dead_letter_goes_back_to_its_place(queue: TransactionQueue) -> None:
    start(queue, 1)
    deliver_head(queue)
    a = meter(queue, 1, 1)
    b = meter(queue, 1, 2)
    queue.failed(a.seq, "CALLERROR InternalError", max_attempts=1)
    c = stop(queue, 1)
    assert queue.pending() == [b, c]
    back = queue.requeue_dead_letter(a.seq)
    assert (back.seq, back.unique_id, back.payload) == (a.seq, a.unique_id, a.payload)
    assert back.attempts == 0  # a fresh attempt budget
    assert back.last_error == "CALLERROR InternalError"  # why it had died
    assert queue.pending() == [back, b, c]
    assert queue.dead_letters() == []
    assert queue.payload_for_sending(back)["transactionId"] == 1001
    # New messages still come after every old one.
    d = meter(queue, 1, 3)
    assert d.seq > c.seq
    with pytest.raises(QueueError, match="no such dead letter"):
        queue.requeue_dead_letter(a.seq)


def test_requeuing_a_start_brings_its_transaction_back(queue: TransactionQueue, db: Path) -> None:
    s1 = start(queue, 1)
    m1 = meter(queue, 1)
    s2 = start(queue, 2)
    e1 = stop(queue, 1)
    queue.failed(s1.seq, "timeout", max_attempts=1)
    # A follower cannot go back before its Start.
    with pytest.raises(QueueError, match="requeue that first"):
        queue.requeue_dead_letter(e1.seq)
    assert len(queue.dead_letters()) == 3
    queue.requeue_dead_letter(s1.seq)
    assert seqs(queue.pending()) == seqs([s1, m1, s2, e1])
    assert [m.unique_id for m in queue.pending()] == [m.unique_id for m in (s1, m1, s2, e1)]
    assert queue.dead_letters() == []
    while queue.head() is not None:
        msg = deliver_head(queue)
        if msg.action != START:
            assert queue.payload_for_sending(msg)["transactionId"] == 1000 + msg.local_tx_id
    with TransactionQueue.open(db) as again:
        assert again.has_message("stop:1") and again.pending_count() == 0


def test_everything_survives_a_reopen(db: Path) -> None:
    with TransactionQueue.open(db) as q:
        start(q, 1)
        start(q, 2)
        deliver_head(q)  # tx 1 has its real id
        q.failed(q.pending()[0].seq, "timeout", max_attempts=1)  # tx 2's start dies
        kept = [meter(q, 1), stop(q, 1)]
        dead = q.dead_letters()
    with TransactionQueue.open(db) as q:
        assert q.pending() == kept
        assert q.dead_letters() == dead
        assert q.real_transaction_id(1) == 1001
        assert q.real_transaction_id(2) is None
        assert q.has_message("start:1") and q.has_message("start:2")
        assert q.payload_for_sending(kept[1])["transactionId"] == 1001


# -- conservation, as a property -------------------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("start")),
    st.tuples(st.just("meter"), st.integers(0, 5)),
    st.tuples(st.just("stop"), st.integers(0, 5)),
    st.tuples(st.just("deliver")),
    st.tuples(st.just("fail"), st.integers(1, 3)),
    st.tuples(st.just("requeue"), st.integers(0, 5)),
    st.tuples(st.just("reopen")),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(_op, max_size=30))
def test_no_message_is_lost_duplicated_or_sent_out_of_order(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[Any, ...]]
) -> None:
    db = tmp_path_factory.mktemp("property") / "station.db"
    q = TransactionQueue.open(db)
    try:
        enqueued: dict[int, QueuedMessage] = {}
        delivered: list[int] = []
        started: list[int] = []
        for op in ops:
            if op[0] == "start":
                started.append(len(started) + 1)
                msg = start(q, started[-1])
                enqueued[msg.seq] = msg
            elif op[0] in ("meter", "stop") and started:
                tx = started[op[1] % len(started)]
                msg = meter(q, tx) if op[0] == "meter" else stop(q, tx)
                enqueued.setdefault(msg.seq, msg)
            elif op[0] == "deliver" and (head := q.head()) is not None:
                if head.action != START:  # never with a placeholder
                    assert q.payload_for_sending(head)["transactionId"] == 1000 + head.local_tx_id
                delivered.append(deliver_head(q).seq)
            elif op[0] == "fail" and (head := q.head()) is not None:
                q.failed(head.seq, "timeout", max_attempts=op[1])
            elif op[0] == "requeue" and (dead := q.dead_letters()):
                letter = dead[op[1] % len(dead)]
                try:
                    q.requeue_dead_letter(letter.seq)
                except QueueError:
                    assert letter.action != START
            elif op[0] == "reopen":
                q.close()
                q = TransactionQueue.open(db)
            pending = seqs(q.pending())
            dead_seqs = [d.seq for d in q.dead_letters()]
            # Every message is in exactly one place; pending is in seq order.
            assert pending == sorted(pending)
            assert Counter(pending + dead_seqs + delivered) == Counter(list(enqueued))
            for msg in q.pending():
                assert msg.unique_id == enqueued[msg.seq].unique_id
                if msg.action != START and q.real_transaction_id(msg.local_tx_id) is None:
                    # Its Start is still ahead of it in the queue.
                    assert any(
                        p.action == START and p.local_tx_id == msg.local_tx_id and p.seq < msg.seq
                        for p in q.pending()
                    )
    finally:
        q.close()


# -- sharing the file with evse.store.Store ---------------------------------------------------


@pytest.mark.parametrize("queue_first", [True, False])
def test_the_queue_and_the_store_share_the_file(db: Path, queue_first: bool) -> None:
    if queue_first:
        q, s = TransactionQueue.open(db), Store.open(db)
    else:
        s, q = Store.open(db), TransactionQueue.open(db)
    try:
        tx = s.begin_transaction(connector_id=1, id_tag="TAG1", meter_start_wh=100.0, started_at=T0)
        first = start(q, tx.id)
        s.set_setting("HeartbeatInterval", "60")
        values = meter(q, tx.id, 5)
        s.record_meter(tx.id, 150.0, T0 + timedelta(seconds=60))
        assert s.schema_version == evse_store.SCHEMA_VERSION
        assert s.pragmas()["user_version"] == evse_store.SCHEMA_VERSION
        assert q.schema_version == SCHEMA_VERSION
    finally:
        q.close()
        s.close()
    with Store.open(db) as s, TransactionQueue.open(db) as q:
        assert s.transaction(tx.id).last_meter_wh == 150.0
        assert s.get_setting("HeartbeatInterval") == "60"
        assert q.pending() == [first, values]
        assert s.pragmas()["user_version"] == evse_store.SCHEMA_VERSION
    assert {"settings", "transactions", "ocpp_queue", "ocpp_meta"} <= tables(db)


def test_concurrent_writes_of_the_queue_and_the_store_never_fail(db: Path) -> None:
    store, q = Store.open(db), TransactionQueue.open(db)
    errors: list[BaseException] = []
    rounds = 150

    def store_side() -> None:
        try:
            tx = store.begin_transaction(
                connector_id=1, id_tag="T", meter_start_wh=0.0, started_at=T0
            )
            for k in range(1, rounds + 1):
                store.record_meter(tx.id, float(k), T0 + timedelta(seconds=k))
                store.set_setting("k", str(k))
        except BaseException as exc:  # reported below
            errors.append(exc)

    def queue_side() -> None:
        try:
            for tx in range(1, rounds + 1):
                start(q, tx)
                meter(q, tx)
                deliver_head(q)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=store_side), threading.Thread(target=queue_side)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert store.get_setting("k") == str(rounds)
        assert q.pending_count() == rounds
        # Two messages a round, one delivered a round: the first half is through.
        assert q.real_transaction_id(rounds // 2) == 1000 + rounds // 2
        assert q.real_transaction_id(rounds // 2 + 1) is None
    finally:
        store.close()
        q.close()


def test_a_write_waits_for_another_connection_instead_of_failing(
    queue: TransactionQueue, db: Path
) -> None:
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # as Store does while it writes
    released = threading.Event()

    def release() -> None:
        time.sleep(0.3)
        holder.execute("COMMIT")
        released.set()

    thread = threading.Thread(target=release)
    thread.start()
    try:
        msg = start(queue, 1)  # blocks until the other commit, then succeeds
        assert released.is_set()
        assert queue.head() == msg
    finally:
        thread.join()
        holder.close()


async def test_calls_from_trio_worker_threads_are_serialized(queue: TransactionQueue) -> None:
    per_tx = 20

    async def transaction(tx: int) -> None:
        await trio.to_thread.run_sync(start, queue, tx)
        for k in range(per_tx):
            await trio.to_thread.run_sync(meter, queue, tx, k)

    async with trio.open_nursery() as nursery:
        for tx in range(1, 9):
            nursery.start_soon(transaction, tx)
    pending = queue.pending()
    assert len(pending) == 8 * (per_tx + 1)
    for tx in range(1, 9):
        mine = [m for m in pending if m.local_tx_id == tx]
        assert mine[0].action == START
        assert [m.payload["meterValue"][0]["sampledValue"][0]["value"] for m in mine[1:]] == [
            str(k) for k in range(per_tx)
        ]


# -- a real kill -9 ----------------------------------------------------------------------------


def _killed_child_run(db: Path, rng: random.Random) -> list[str]:
    """Run the child, SIGKILL it at a random moment; the whole lines it printed."""
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
        assert first == "ready\n", f"child failed: {first!r} {proc.stderr.read()}"
        # The child prints about 3,150 lines in all: most runs die half-way.
        lines = [proc.stdout.readline() for _ in range(rng.randint(1, 3300))]
        time.sleep(rng.uniform(0, 0.002))
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        assert proc.wait() == -signal.SIGKILL
        assert proc.stderr.read() == ""  # no thread died of an exception
    finally:
        watchdog.cancel()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    # A line cut short by the kill was not printed whole: it does not count.
    text = "".join(lines) + rest
    return text.split("\n")[:-1]


def _check_after_the_kill(db: Path, lines: list[str], where: tuple[int, int]) -> None:
    enqueued: dict[int, str] = {}  # seq -> unique_id, as printed
    sent: list[tuple[int, str]] = []
    delivered: list[int] = []
    failures: Counter[int] = Counter()
    for line in lines:
        word, *rest = line.split()
        if word == "enqueued":
            seq, action, tx, uid = int(rest[0]), rest[1], int(rest[2]), rest[3]
            planned = child.plan(seq - 1)  # a fresh file: seq k is the k-th message
            assert (action, tx) == (planned[0], planned[1]), (where, line)
            enqueued[seq] = uid
        elif word == "sent":
            sent.append((int(rest[0]), rest[1]))
        elif word == "delivered":
            delivered.append(int(rest[0]))
        elif word == "failed":
            failures[int(rest[0])] += 1
        else:
            assert word == "done", (where, line)  # "wrong" lines included
    n = len(enqueued)
    assert sorted(enqueued) == list(range(1, n + 1)), where
    # FIFO: delivered in seq order, each once, a prefix of what was enqueued.
    assert delivered == list(range(1, len(delivered) + 1)), where
    in_flight = [seq for seq, _ in sent if seq not in set(delivered)]
    assert len(in_flight) <= 1, where  # one message at a time

    with TransactionQueue.open(db) as q:
        pending = q.pending(limit=2 * child.TOTAL)
        pending_seqs = seqs(pending)
        # One more enqueue may have committed before its line was printed
        # (and even been taken by the consumer, which prints "sent" first).
        extra = n + 1 in pending_seqs or n + 1 in {seq for seq, _ in sent}
        committed = n + 1 if extra else n
        assert pending_seqs == sorted(pending_seqs), where
        gone = set(range(1, committed + 1)) - set(pending_seqs)
        # Every printed enqueue is delivered or pending; every printed delivery
        # is gone; only the message in flight may be gone without a print.
        assert set(pending_seqs) <= set(range(1, committed + 1)), where
        assert set(delivered) <= gone <= set(delivered) | set(in_flight), where
        for msg in pending:
            planned_action, tx, _, payload = child.plan(msg.seq - 1)
            assert (msg.action, msg.local_tx_id) == (planned_action, tx), where
            if msg.seq in enqueued:
                assert msg.unique_id == enqueued[msg.seq], where
            if planned_action != START:
                payload = {**payload, "transactionId": -tx}
            assert msg.payload == payload, where
            assert msg.attempts in (failures[msg.seq], failures[msg.seq] + 1), where
            assert msg.attempts <= 1, where
        for seq, uid in sent:
            if seq in pending_seqs:  # the documented resend: same message id
                assert seq in in_flight and pending[0].seq == seq and pending[0].unique_id == uid, (
                    where
                )
        # transactionId: known exactly for the transactions whose Start is gone.
        for tx in range(1, (committed - 1) // child.PER_TX + 2):
            start_seq = (tx - 1) * child.PER_TX + 1
            if start_seq in gone:
                assert q.real_transaction_id(tx) == child.REAL_ID_OFFSET + tx, where
            else:
                assert q.real_transaction_id(tx) is None, where
        for msg in pending:
            if msg.action == START:
                continue
            if q.real_transaction_id(msg.local_tx_id) is None:
                with pytest.raises(QueueError):
                    q.payload_for_sending(msg)
            else:
                wanted = child.REAL_ID_OFFSET + msg.local_tx_id
                assert q.payload_for_sending(msg)["transactionId"] == wanted, where

        # The station comes back: it reports its transactions' ends again
        # (dedupe keys: only the unfinished one gets a new Stop) ...
        added = 0
        for tx in range(1, (committed - 1) // child.PER_TX + 2):
            assert start(q, tx).seq == (tx - 1) * child.PER_TX + 1, where
            before = q.pending_count()
            stop(q, tx, reason="PowerLoss")
            added += q.pending_count() - before
        assert added <= 1, where
        # ... and sends everything left: the central system, deduplicating by
        # message id, ends up with every message exactly once.
        received = [uid for _, uid in sent]
        while (head := q.head()) is not None:
            if head.action != START:
                wanted = child.REAL_ID_OFFSET + head.local_tx_id
                assert q.payload_for_sending(head)["transactionId"] == wanted, where
            received.append(head.unique_id)
            deliver_head(q, real_offset=child.REAL_ID_OFFSET)
        counts = Counter(received)
        assert len(counts) == committed + added, where
        twice = [uid for uid, count in counts.items() if count > 1]
        assert twice == [uid for seq, uid in sent if seq in in_flight and seq in pending_seqs], (
            where
        )
        assert max(counts.values()) <= 2, where
        assert q.dead_letters() == [], where


@pytest.mark.slow
def test_kill_9_loses_reorders_and_duplicates_nothing(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for run in range(6):
        db = tmp_path / f"crash{run}.db"
        lines = _killed_child_run(db, rng)
        _check_after_the_kill(db, lines, (seed, run))
