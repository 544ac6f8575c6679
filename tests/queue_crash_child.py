"""Child process for the kill -9 test in test_ocpp_queue.py.

``python queue_crash_child.py DB``: opens the queue and runs two threads on
it until killed:

* a producer enqueues ``TOTAL`` messages: transactions of ``PER_TX``
  messages each (StartTransaction, MeterValues..., StopTransaction), the
  k-th message (0-based) being ``plan(k)``; Start and Stop carry the dedupe
  keys ``start:<tx>`` / ``stop:<tx>``. After each ``enqueue`` returns it
  prints ``enqueued <seq> <action> <local_tx_id> <unique_id>``.
* a consumer plays sender and central system: once a backlog has built up
  (so that messages are pending at any moment), it takes ``head()``,
  prints ``sent <seq> <unique_id>`` (the central system has it from here
  on), calls ``delivered`` with ``{"transactionId": 1000 + tx}`` for a Start,
  and prints ``delivered <seq> <unique_id>`` after it returns. Every message
  whose seq is a multiple of ``FAIL_EVERY`` first gets one CALLERROR
  (``failed``, printed ``failed <seq>`` after it returns). A Stop or
  MeterValues whose ``payload_for_sending`` lacks the real id prints
  ``wrong <seq> ...``.

Every line is written whole and flushed, under a lock, after the call it
reports has returned. At the end it prints ``done`` and waits to be killed.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from ocpp16.queue import MessageKind, TransactionQueue

TOTAL = 1000
PER_TX = 20
BACKLOG = 25  # the consumer delivers only while more than this many are pending
FAIL_EVERY = 7
MAX_ATTEMPTS = 1000  # never reached: nothing dies in this test
REAL_ID_OFFSET = 1000


def plan(k: int) -> tuple[MessageKind, int, str | None, dict[str, Any]]:
    """The k-th message (0-based): action, local transaction id, dedupe key, payload."""
    tx = k // PER_TX + 1
    position = k % PER_TX
    stamp = f"2026-03-01T12:{k // 60 % 60:02d}:{k % 60:02d}.000Z"
    if position == 0:
        payload = {"connectorId": 1, "idTag": "CRASH", "meterStart": k, "timestamp": stamp}
        return MessageKind.START, tx, f"start:{tx}", payload
    if position == PER_TX - 1:
        payload = {"meterStop": k, "timestamp": stamp, "reason": "Local"}
        return MessageKind.STOP, tx, f"stop:{tx}", payload
    payload = {
        "connectorId": 1,
        "meterValue": [{"timestamp": stamp, "sampledValue": [{"value": str(k)}]}],
    }
    return MessageKind.METER_VALUES, tx, None, payload


class Output:
    def __init__(self) -> None:
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()


def produce(queue: TransactionQueue, out: Output, finished: threading.Event) -> None:
    for k in range(TOTAL):
        action, tx, key, payload = plan(k)
        msg = queue.enqueue(action, payload, local_tx_id=tx, dedupe_key=key)
        out.line(f"enqueued {msg.seq} {msg.action} {msg.local_tx_id} {msg.unique_id}")
    finished.set()


def consume(queue: TransactionQueue, out: Output, finished: threading.Event) -> None:
    while True:
        if not finished.is_set() and queue.pending_count() <= BACKLOG:
            time.sleep(0.0005)
            continue
        msg = queue.head()
        if msg is None:
            return
        if msg.seq % FAIL_EVERY == 0 and msg.attempts == 0:
            queue.failed(msg.seq, "CALLERROR InternalError", max_attempts=MAX_ATTEMPTS)
            out.line(f"failed {msg.seq}")
            continue
        payload = queue.payload_for_sending(msg)
        if msg.action != MessageKind.START:
            wanted = REAL_ID_OFFSET + msg.local_tx_id
            if payload.get("transactionId") != wanted:
                out.line(f"wrong {msg.seq} {payload.get('transactionId')!r} != {wanted}")
        out.line(f"sent {msg.seq} {msg.unique_id}")
        response: dict[str, Any] = {}
        if msg.action == MessageKind.START:
            response = {
                "idTagInfo": {"status": "Accepted"},
                "transactionId": REAL_ID_OFFSET + msg.local_tx_id,
            }
        queue.delivered(msg.seq, response)
        out.line(f"delivered {msg.seq} {msg.unique_id}")


def main(path: str) -> None:
    queue = TransactionQueue.open(path)
    out = Output()
    finished = threading.Event()
    out.line("ready")
    threads = [
        threading.Thread(target=produce, args=(queue, out, finished), daemon=True),
        threading.Thread(target=consume, args=(queue, out, finished), daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.line("done")
    time.sleep(3600)  # killed by the parent


if __name__ == "__main__":
    main(sys.argv[1])
