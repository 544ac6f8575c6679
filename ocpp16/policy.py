"""The charge point's decisions, pure: what to report when, what to sample when.

No trio and no I/O: every method takes ``now`` (trio's clock for durations,
a datetime for the clock-aligned schedule) and returns a decision; the tasks
in ``ocpp16.profiles.core`` wait, read the station and send. So these rules
are tested with plain numbers (tests/test_ocpp_policies.py).

* ``StatusPolicy``: StatusNotification (OCPP 1.6 section 4.9). Every
  connector's status is reported on each (re)connect and on every change, once
  it has held for MinimumStatusDuration (section 9.1), so short flickers are
  not sent; Faulted is reported at once. A status of a running transaction
  waits for its StartTransaction to be answered, the order a central system
  (and the OCA test tool) expects, but never longer than
  ``START_ORDER_PATIENCE``: a stuck queue must not hide the status.
* ``TransactionSampling``: per running transaction, when it started (sampled
  meter values count MeterValueSampleInterval from the transaction's start,
  section 9.1) and its StopTxnSampledData (sent in StopTransaction.req
  ``transactionData``, section 4.10).
* ``AlignedSchedule``: ClockAlignedDataInterval boundaries (aligned to
  midnight, ``metering.next_aligned``), each read once even when the clock
  steps back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ocpp16.metering import next_aligned
from ocpp16.vocabulary import TRANSACTION_STATUSES, Status

#: (ChargePointStatus, ChargePointErrorCode, info) of a connector; 0 = the station.
ConnectorStatus = tuple[str, str, str]

#: How long a transaction status waits for its StartTransaction to be answered.
START_ORDER_PATIENCE = 10.0
#: StatusNotification.req ``info`` is CiString50Type (OCPP 1.6 section 6).
INFO_LENGTH = 50


# -- status notifications --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusDecision:
    """Report the connector's status now, or not yet."""

    report: bool
    #: Seconds until it may be reported; ``math.inf`` when there is nothing to report.
    wait: float = math.inf


NOTHING_TO_REPORT = StatusDecision(report=False)
REPORT_NOW = StatusDecision(report=True, wait=0.0)


class StatusPolicy:
    def __init__(self) -> None:
        #: The status last reported per connector, on this connection.
        self._reported: dict[int, ConnectorStatus] = {}
        #: The status last seen per connector and since when (trio time).
        self._seen: dict[int, tuple[ConnectorStatus, float]] = {}
        #: Since when a transaction status waits for its StartTransaction.
        self._start_wait_since: float | None = None

    def reconnected(self) -> None:
        """A new connection: every connector's status is reported again."""
        self._reported.clear()

    def decide(
        self, connector_id: int, current: ConnectorStatus, *, now: float, minimum: float
    ) -> StatusDecision:
        """Whether ``current`` (the connector's status at ``now``) is reported now.

        ``minimum`` is MinimumStatusDuration in seconds: a status that changed
        less than that ago waits (a fault never does).
        """
        seen = self._seen.get(connector_id)
        if seen is None or seen[0] != current:
            seen = (current, now)
            self._seen[connector_id] = seen
        if self._reported.get(connector_id) == current:
            return NOTHING_TO_REPORT
        held = now - seen[1]
        if current[0] != Status.FAULTED and held < minimum:
            return StatusDecision(report=False, wait=minimum - held)
        return REPORT_NOW

    def reported(self, connector_id: int, current: ConnectorStatus) -> None:
        """The central system accepted this StatusNotification."""
        self._reported[connector_id] = current

    def is_reported(self, connector_id: int, current: ConnectorStatus) -> bool:
        """Whether ``current`` is what this connection last reported for the connector."""
        return self._reported.get(connector_id) == current

    @staticmethod
    def follows_start(current: ConnectorStatus) -> bool:
        """The status belongs to a running transaction: it goes after StartTransaction."""
        return current[0] in TRANSACTION_STATUSES

    def ask_queue(self, now: float) -> bool:
        """Whether to ask the queue if a StartTransaction is still unanswered; False
        when the patience ran out (the status is reported without asking)."""
        if self._start_wait_since is None:
            self._start_wait_since = now
            return True
        if now - self._start_wait_since >= START_ORDER_PATIENCE:
            # The queue is stuck (errors, retries): status must not wait for it.
            self._start_wait_since = None
            return False
        return True

    def start_wait(self, now: float, start_pending: bool) -> float | None:
        """The queue's answer: None to report the status now, else seconds to wait
        (the queue sender wakes the status task earlier, once the Start is answered)."""
        if not start_pending:
            self._start_wait_since = None
            return None
        since = self._start_wait_since if self._start_wait_since is not None else now
        return max(0.0, since + START_ORDER_PATIENCE - now)


def status_notification(
    connector_id: int, current: ConnectorStatus, timestamp: str
) -> dict[str, Any]:
    """The StatusNotification.req payload (OCPP 1.6 sections 4.9 and 6)."""
    status, error, info = current
    payload: dict[str, Any] = {
        "connectorId": connector_id,
        "status": status,
        "errorCode": error,
        "timestamp": timestamp,
    }
    if info:
        payload["info"] = info[:INFO_LENGTH]
    return payload


# -- meter values ------------------------------------------------------------------------


class TransactionSampling:
    """Per running transaction (local id): its start on trio's clock and the
    StopTxnSampledData collected so far."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self._values: dict[int, list[dict[str, Any]]] = {}

    def begin(self, local_id: int, now: float, first: dict[str, Any] | None = None) -> None:
        """A transaction started at ``now``; ``first`` is its Transaction.Begin value."""
        self._values[local_id] = [first] if first is not None else []
        self._started[local_id] = now

    def add(self, local_id: int, value: dict[str, Any]) -> None:
        """One more StopTxnSampledData MeterValue of the transaction."""
        self._values.setdefault(local_id, []).append(value)

    def end(self, local_id: int) -> list[dict[str, Any]]:
        """The transaction's values so far, oldest first; its sampling stops."""
        self._started.pop(local_id, None)
        return self._values.pop(local_id, [])

    def next_due(self, now: float, interval: int) -> tuple[float, int] | None:
        """The next periodic sample (trio time, local id), or None (interval 0, or no
        transaction). Counted from each transaction's start: every ``interval``
        seconds after it, the first one ``interval`` after the start."""
        if interval <= 0:
            return None
        due = [
            (started + (int((now - started) // interval) + 1) * interval, local)
            for local, started in self._started.items()
        ]
        return min(due) if due else None


class AlignedSchedule:
    """The next clock-aligned boundary; each one read once."""

    def __init__(self) -> None:
        self.last: datetime | None = None

    def next(self, now: datetime, interval: int) -> datetime:
        """The first boundary after ``now`` and after the last one read (a clock
        that steps back does not bring a boundary read already again)."""
        after = max(now, self.last) if self.last else now
        return next_aligned(after, interval)

    def read(self, boundary: datetime) -> None:
        self.last = boundary
